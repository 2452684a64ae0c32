"""`scripts/evaluate_run.py run=<run>`: every checkpoint of a run (or the last N), every test set (generation +
WER) and every likelihood benchmark, skipping what is already there; here one task after the other, or on
Slurm as an array job with one task per (checkpoint, test set or benchmark) (docs/evaluation.md).

A task is one `scripts/generate.py` or `scripts/evaluate.py` command line. Its output directory is decided
from its composed configuration by the same functions the scripts use (`generation_target`,
`evaluation_target`), so a task whose last file (`wer.json`, or `summary.json`) is in place is never started
nor submitted; a task that finds its output created meanwhile exits with code 3 and counts as done, and a
generations folder without its score (killed between the two by an earlier version) is scored by its task.
"""

from __future__ import annotations

import datetime
import os
import shlex
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from ssi import report_error, run_dir, setup_cli_logging
from ssi.config import MissingSettingError, required, to_container
from ssi.data import DataValidationError
from ssi.eval.items import BenchmarkError
from ssi.eval.pipeline import EXIT_OUTPUT_EXISTS, evaluation_target
from ssi.files import atomic_write_text
from ssi.generate import GenerationError
from ssi.generate.pipeline import generation_target
from ssi.hf_dir import METHOD_MANIFEST
from ssi.overrides import composition_problem

LAUNCHERS = ("local", "slurm", "print")
SCRIPT_PREFIXES = ("generate", "evaluate")  # a task's script: argv prefix, conf/<name>.yaml and scripts/<name>.py
SLURM_SNIPPET = "snippets/evaluate_tasks.sbatch"


@dataclass(frozen=True)
class Task:
    """One command line: a checkpoint with one test set or one benchmark."""

    checkpoint: run_dir.CheckpointInfo
    script: str  # generate | evaluate
    target: str  # the split or the benchmark file
    final_file: Path  # the last file the task writes: it is done when this is in place
    overrides: tuple[str, ...]

    @property
    def done(self) -> bool:
        return self.final_file.exists()

    def argv(self, repo: Path) -> list[str]:
        return [str(repo / "scripts" / f"{self.script}.py"), *self.overrides]

    def describe(self) -> str:
        return f"step {self.checkpoint.step} {self.script} {self.target}"


def split_arguments(argv: Sequence[str]) -> tuple[list[str], dict[str, list[str]]]:
    """This command's own overrides, and those routed elsewhere: `generate.backend=torch` goes to generate.py
    as `backend=torch`, `+evaluate.sequence.dedup=true` to evaluate.py as `+sequence.dedup=true`, and
    `sbatch.gpus-per-node=1` to sbatch as `--gpus-per-node=1` (Hydra's grammar would need quotes for it)."""
    own: list[str] = []
    routed: dict[str, list[str]] = {name: [] for name in (*SCRIPT_PREFIXES, "sbatch")}
    for arg in argv:
        plus = arg[: len(arg) - len(arg.lstrip("+~"))]
        head, dot, rest = arg[len(plus) :].partition(".")
        if dot and head in SCRIPT_PREFIXES and "=" in rest:
            routed[head].append(plus + rest)
        elif dot and head == "sbatch" and not plus:
            routed["sbatch"].append(f"--{rest}")
        else:
            own.append(arg)
    return own, routed


def _test_sets(value: Any) -> list[tuple[str, list[str]]]:
    """`test_sets` entries: a split name, or `{split: <name>, overrides: [generate.py overrides...]}`."""
    entries = []
    for entry in value or []:
        if isinstance(entry, str):
            entries.append((entry, []))
        elif isinstance(entry, dict) and "split" in entry and set(entry) <= {"split", "overrides"}:
            entries.append((str(entry["split"]), [str(o) for o in entry.get("overrides") or []]))
        else:
            raise GenerationError(f"test_sets: expected a split name or {{split, overrides}}, got {entry!r}")
    return entries


def plan(cfg: DictConfig, routed: dict[str, list[str]], conf_dir: Path) -> list[Task]:
    """Every task of the run, done or not, checkpoint by checkpoint (oldest first)."""
    try:
        run = Path(required(cfg, "run", " (a training run directory: output_dir of a recipe)"))
    except MissingSettingError as err:
        raise GenerationError(str(err)) from None
    if not (run / run_dir.CONFIG_FILE).is_file():
        raise GenerationError(f"{run} is not a training run directory (no {run_dir.CONFIG_FILE})")
    checkpoints = run_dir.list_checkpoints(run)
    if not checkpoints:
        raise GenerationError(f"{run} has no complete checkpoint under {run / run_dir.CHECKPOINTS_DIR}")
    last = cfg.last
    if last is not None:
        if int(last) < 1:
            raise GenerationError(f"last must be >= 1 (the newest N checkpoints) or null, got {last}")
        checkpoints = checkpoints[-int(last) :]
    test_sets, benchmarks = _test_sets(to_container(cfg.test_sets)), [str(b) for b in cfg.benchmarks or []]
    if not test_sets and not benchmarks:
        raise GenerationError("nothing to do: give test_sets=[...] and/or benchmarks=[...]")
    for benchmark in benchmarks:
        if not Path(benchmark).is_file():
            raise GenerationError(f"benchmarks: {benchmark} not found")
    tasks = []
    with initialize_config_dir(config_dir=str(conf_dir.resolve()), version_base=None):
        for ckpt in checkpoints:
            model = f"model={ckpt.path}"
            for split, extra in test_sets:
                overrides = (model, f"gen.split={split}", *routed["generate"], *extra)
                composed = _compose("generate", overrides, conf_dir)
                target = generation_target(composed)
                final = run_dir.WER_FILE if composed.score else run_dir.GENERATIONS_FILE
                tasks.append(Task(ckpt, "generate", split, target.output_dir / final, overrides))
            if benchmarks and (ckpt.path / METHOD_MANIFEST).is_file():
                raise GenerationError(
                    f"benchmarks={benchmarks}: {ckpt.path} is a method=features checkpoint, which reads audio and "
                    "has no speech units whose candidate likelihoods they compare; give test_sets only"
                )
            for benchmark in benchmarks:
                overrides = (model, f"benchmark={Path(benchmark).resolve()}", *routed["evaluate"])
                target = evaluation_target(_compose("evaluate", overrides, conf_dir))
                tasks.append(Task(ckpt, "evaluate", benchmark, target.output_dir / run_dir.SUMMARY_FILE, overrides))
    return tasks


def _compose(name: str, overrides: Sequence[str], conf_dir: Path) -> DictConfig:
    try:
        return compose(config_name=name, overrides=list(overrides))
    except Exception:  # Hydra's override grammar and config errors: report them before any task runs
        problem = composition_problem(name, overrides, conf_dir) or f"conf/{name}.yaml does not compose"
        raise GenerationError(f"{problem} (overrides {list(overrides)})") from None


def run_local(tasks: Sequence[Task], python: str, repo: Path) -> dict[str, int]:
    """Run the tasks one after the other, in this process's directory; a failing task does not stop the others."""
    counts = {"done": 0, "already there": 0, "failed": 0}
    for number, task in enumerate(tasks, start=1):
        print(f"=== [{number}/{len(tasks)}] {task.describe()} ({task.checkpoint.path})", flush=True)
        code = subprocess.run([python, *task.argv(repo)]).returncode  # in this directory: relative paths hold
        key = "done" if code == 0 else "already there" if code == EXIT_OUTPUT_EXISTS else "failed"
        counts[key] += 1
        if key == "failed":
            print(f"FAILED (exit {code}): {task.describe()}", file=sys.stderr, flush=True)
    return counts


def write_task_list(tasks: Sequence[Task], run: Path, repo: Path) -> Path:
    """`<run>/evaluations/tasks/<time>/tasks.txt`: line i is the command of array task i."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    path = run_dir.evaluation_tasks_dir(run, stamp) / "tasks.txt"
    atomic_write_text(path, "".join(shlex.join(t.argv(repo)) + "\n" for t in tasks))
    return path


def submit_slurm(
    tasks: Sequence[Task], cfg: DictConfig, options: Sequence[str], python: str, repo: Path
) -> tuple[str, Path]:
    """One array job, one task per line of the task list; returns the job id and the task list."""
    task_list = write_task_list(tasks, Path(cfg.run), repo)
    parallel = f"%{int(cfg.slurm.max_parallel)}" if cfg.slurm.max_parallel else ""
    command = [
        "sbatch",
        "--parsable",
        f"--array=0-{len(tasks) - 1}{parallel}",
        f"--job-name={cfg.slurm.job_name}",
        f"--output={task_list.parent}/task-%a.out",
        f"--chdir={Path.cwd()}",  # the tasks see paths as this command did
        f"--export=ALL,SSI_PYTHON={python}",
        *[str(a) for a in cfg.slurm.sbatch_args or []],
        *options,
        str(repo / SLURM_SNIPPET),
        str(task_list),
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise GenerationError(f"sbatch failed (exit {done.returncode}): {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout.strip().split(";")[0], task_list


def main(argv: Sequence[str], repo: Path) -> int:
    """scripts/evaluate_run.py's body: exit 0 when every task is done or was already there, 1 if a local task
    failed, 2 on bad input."""
    setup_cli_logging()
    own, routed = split_arguments(argv)
    try:
        with initialize_config_dir(config_dir=str((repo / "conf").resolve()), version_base=None):
            cfg = _compose("evaluate_run", own, repo / "conf")
        launcher = str(cfg.launcher)
        if launcher not in LAUNCHERS:
            raise GenerationError(f"launcher must be one of {LAUNCHERS}, got {launcher!r}")
        tasks = plan(cfg, routed, repo / "conf")
    except (GenerationError, BenchmarkError, DataValidationError) as err:
        return report_error(err)
    todo = [t for t in tasks if not t.done]
    print(
        f"{cfg.run}: {len({t.checkpoint.path for t in tasks})} checkpoints, {len(tasks)} tasks, "
        f"{len(tasks) - len(todo)} already there, {len(todo)} to run"
    )
    python = os.environ.get("SSI_PYTHON") or sys.executable
    if launcher == "print" or not todo:
        for task in todo:
            print(shlex.join([python, *task.argv(repo)]))
        return 0
    if launcher == "slurm":
        try:
            job, task_list = submit_slurm(todo, cfg, routed["sbatch"], python, repo)
        except GenerationError as err:
            return report_error(err)
        print(f"submitted Slurm array job {job}: {len(todo)} tasks listed in {task_list}, logs beside it")
        return 0
    counts = run_local(todo, python, repo)
    there = len(tasks) - len(todo) + counts["already there"]  # skipped at the start, or made meanwhile
    print(
        f"evaluate_run: {counts['done']} done, {counts['failed']} failed, {there} already there "
        f"({len(todo)} tasks run, {len(tasks)} in all)"
    )
    return 1 if counts["failed"] else 0
