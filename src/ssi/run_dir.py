"""Every path of a run directory, in one place: where checkpoints, logs, generations, scores and
evaluations of a training run live, how to find them, and how to read the run's metric logs.

```
<run>/torchtune_config.yaml                          the fully resolved config of the run
<run>/logs/log_<time>.txt                            metrics, one `Step <n> | key:value ...` line per log call
<run>/logs/stops.jsonl                               why each attempt stopped (max_steps, max_tokens, signal...)
<run>/checkpoints/epoch_<E>/global_step_<S>/         a complete HF model directory (LoRA: merged)
    adapter/                                         trainable=lora: the same model as a PEFT adapter
    training_state/training_state.pt                 optimizer, schedule, RNG, counters (exact resume)
    training_state/master_weights.safetensors        fp32 weights when the HF weights are saved in bf16
    training_state/trained.safetensors               frozen base (new_embeddings, lora): what was trained
<run>/generations/epoch_<E>/global_step_<S>/<dataset>/<split>/   generations.jsonl, generation_config.yaml, wer.json
<run>/evaluations/epoch_<E>/global_step_<S>/<benchmark>/         scores.jsonl, summary.json, [zerospeech/]
<run>/evaluations/tasks/<time>/                      an evaluate_run Slurm array: tasks.txt, task-<i>.out
```

docs/run_directory.md is the contract. Writers create these paths through the functions here; readers
(resume, generation, scoring, reports) parse them through the functions here (`list_checkpoints`,
`list_generations`, `list_evaluations`, `read_metrics`, `start_checkpoint` for `model=<run>`), so the layout
has one owner.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from ssi.hf_dir import missing_files

log = logging.getLogger(__name__)

CONFIG_FILE = "torchtune_config.yaml"
LOGS_DIR = "logs"
CHECKPOINTS_DIR = "checkpoints"
# One copy per run of the weight shards that checkpoints share unchanged (a frozen base): checkpoints hard-link them.
FROZEN_DIR = ".frozen"
GENERATIONS_DIR = "generations"
EVALUATIONS_DIR = "evaluations"
TRAINING_STATE_DIR = "training_state"
TRAINING_STATE_FILE = "training_state.pt"
MASTER_WEIGHTS_FILE = "master_weights.safetensors"
TRAINED_TENSORS_FILE = "trained.safetensors"  # trainable=new_embeddings|lora: only what was trained
STOPS_FILE = "stops.jsonl"  # under logs/: why and where each attempt of the run stopped
GENERATIONS_FILE = "generations.jsonl"
GENERATION_CONFIG_FILE = "generation_config.yaml"
WER_FILE = "wer.json"
SCORES_FILE = "scores.jsonl"
SUMMARY_FILE = "summary.json"
ZEROSPEECH_DIR = "zerospeech"  # in a benchmark's folder: scores in the ZeroSpeech 2021 submission layout
TASKS_DIR = "tasks"  # under evaluations/: one folder per evaluate_run Slurm submission
_EPOCH_RE = re.compile(r"^epoch_(\d+)$")
_STEP_RE = re.compile(r"^global_step_(\d+)$")
# Hidden names of a checkpoint being written (ssi.files.atomic_output_dir: `partial-<host>-<pid>`) or deleted
# (`deleting-<pid>`).
_LEFTOVER_RE = re.compile(r"^\.global_step_\d+\.(partial|deleting)-(?:.+-)?(\d+)$")
_STEP_LINE = re.compile(r"^Step (\d+) \| (.*)$")


class RunDirError(ValueError):
    """A run directory, checkpoint or run file that is not where or what the layout says."""


# --- paths -----------------------------------------------------------------------------------------------


def step_dirs(epoch: int, step: int) -> Path:
    """`epoch_<E>/global_step_<S>`: how checkpoints, generations and evaluations name a training step."""
    if epoch < 0 or step < 0:
        raise RunDirError(f"epoch and step must be >= 0, got epoch={epoch}, step={step}")
    return Path(f"epoch_{epoch}") / f"global_step_{step}"


def checkpoint_dir(run: Path, epoch: int, step: int) -> Path:
    return Path(run) / CHECKPOINTS_DIR / step_dirs(epoch, step)


def frozen_weights_dir(run: Path) -> Path:
    """`<run>/checkpoints/.frozen`: the weight files checkpoints share (ssi.model.checkpointer)."""
    return Path(run) / CHECKPOINTS_DIR / FROZEN_DIR


def generations_dir(run: Path, epoch: int, step: int, dataset: str, split: str) -> Path:
    return Path(run) / GENERATIONS_DIR / step_dirs(epoch, step) / dataset / split


def evaluations_dir(run: Path, epoch: int, step: int, benchmark: str) -> Path:
    return Path(run) / EVALUATIONS_DIR / step_dirs(epoch, step) / benchmark


def evaluation_tasks_dir(run: Path, stamp: str) -> Path:
    """Where one `scripts/evaluate_run.py launcher=slurm` submission keeps its task list and task logs."""
    return Path(run) / EVALUATIONS_DIR / TASKS_DIR / stamp


def training_state_dir(ckpt_dir: str | Path) -> Path:
    """Where a checkpoint keeps its resume state (and whatever a `training_state_writer` added)."""
    return Path(ckpt_dir) / TRAINING_STATE_DIR


def _parse_step_dirs(epoch_dir: Path, step_dir: Path) -> tuple[int, int] | None:
    epoch_match, step_match = _EPOCH_RE.match(epoch_dir.name), _STEP_RE.match(step_dir.name)
    if epoch_match and step_match:
        return int(epoch_match.group(1)), int(step_match.group(1))
    return None


@dataclass(frozen=True)
class CheckpointLocation:
    """A checkpoint inside a run (`<run>/checkpoints/epoch_E/global_step_S`), or None fields outside one."""

    run_dir: Path | None
    epoch: int | None
    step: int | None

    @property
    def run_config(self) -> Path | None:
        return self.run_dir / CONFIG_FILE if self.run_dir else None


def locate_checkpoint(model_dir: str | Path) -> CheckpointLocation:
    """The run, epoch and step of a checkpoint directory, from its place in the layout."""
    path = Path(model_dir).resolve()
    parsed = _parse_step_dirs(path.parent, path)
    run = path.parent.parent.parent
    if parsed and path.parent.parent.name == CHECKPOINTS_DIR and (run / CONFIG_FILE).is_file():
        return CheckpointLocation(run, *parsed)
    return CheckpointLocation(None, None, None)


@dataclass(frozen=True)
class OutputLocation:
    """Where a file under `generations/` (or `evaluations/`) sits: its step, and the folders below it."""

    epoch: int
    global_step: int
    dataset: str
    split: str


def locate_generations(path: Path) -> OutputLocation | None:
    """Parse `.../epoch_<E>/global_step_<S>/<dataset>/<split>/<file>`; None for files elsewhere."""
    path = Path(path).absolute()
    parents = path.parents
    if len(parents) < 4:
        return None
    parsed = _parse_step_dirs(parents[3], parents[2])
    if parsed is None:
        return None
    return OutputLocation(parsed[0], parsed[1], parents[1].name, parents[0].name)


def is_run_dir(path: str | Path) -> bool:
    """A training run's directory: it has the run's config (written when training starts)."""
    return (Path(path) / CONFIG_FILE).is_file()


@dataclass(frozen=True)
class StepOutput:
    """One folder of results computed from a checkpoint: `generations/<step>/<dataset>/<split>/` (name is
    `<dataset>/<split>`) or `evaluations/<step>/<benchmark>/` (name is the benchmark)."""

    path: Path
    epoch: int
    step: int
    name: str


def _step_output_dirs(root: Path) -> list[tuple[Path, int, int]]:
    """`root/epoch_<E>/global_step_<S>` folders (hidden ones, being written or deleted, never match)."""
    found = []
    if not root.is_dir():
        return found
    for epoch_dir in root.iterdir():
        if not _EPOCH_RE.match(epoch_dir.name) or not epoch_dir.is_dir():
            continue
        for step_dir in epoch_dir.iterdir():
            parsed = _parse_step_dirs(epoch_dir, step_dir)
            if parsed and step_dir.is_dir():
                found.append((step_dir, *parsed))
    return found


def _visible_dirs(path: Path) -> list[Path]:
    return [d for d in path.iterdir() if not d.name.startswith(".") and d.is_dir()]


def list_generations(run: str | Path) -> list[StepOutput]:
    """Every `<dataset>/<split>` folder under the run's `generations/`, by step (it may lack `wer.json`)."""
    found = [
        StepOutput(split_dir, epoch, step, f"{dataset_dir.name}/{split_dir.name}")
        for step_dir, epoch, step in _step_output_dirs(Path(run) / GENERATIONS_DIR)
        for dataset_dir in _visible_dirs(step_dir)
        for split_dir in _visible_dirs(dataset_dir)
    ]
    return sorted(found, key=lambda o: (o.step, o.epoch, o.name))


def list_evaluations(run: str | Path) -> list[StepOutput]:
    """Every `<benchmark>` folder under the run's `evaluations/`, by step (it may lack `summary.json`)."""
    found = [
        StepOutput(bench_dir, epoch, step, bench_dir.name)
        for step_dir, epoch, step in _step_output_dirs(Path(run) / EVALUATIONS_DIR)
        for bench_dir in _visible_dirs(step_dir)
    ]
    return sorted(found, key=lambda o: (o.step, o.epoch, o.name))


# --- checkpoints -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    epoch: int
    step: int


def list_checkpoints(output_dir: str | Path) -> list[CheckpointInfo]:
    """Complete checkpoints of a run, oldest first (by global step, then epoch). Partial writes
    live under hidden names and are never listed; a visible directory that lacks files (damaged by
    hand) is skipped with a warning."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    found = []
    if not root.is_dir():
        return found
    for epoch_dir in root.iterdir():
        epoch_match = _EPOCH_RE.match(epoch_dir.name)
        if not epoch_match or not epoch_dir.is_dir():
            continue
        for step_dir in epoch_dir.iterdir():
            step_match = _STEP_RE.match(step_dir.name)
            if not step_match or not step_dir.is_dir():
                continue
            missing = missing_files(step_dir)
            if missing:
                log.warning("ignoring %s: missing %s", step_dir, ", ".join(missing))
                continue
            found.append(CheckpointInfo(step_dir, int(epoch_match.group(1)), int(step_match.group(1))))
    return sorted(found, key=lambda c: (c.step, c.epoch))


def resolve_checkpoint(output_dir: str | Path, spec: str | Path, missing_ok: bool = False) -> Path | None:
    """`resume_from_checkpoint`: "latest" (the run's newest complete checkpoint) or a checkpoint path.

    With `missing_ok`, "latest" in a run without checkpoints gives None instead of an error, so a
    requeued job script can always pass `latest` and its first start begins from scratch."""
    if str(spec) == "latest":
        checkpoints = list_checkpoints(output_dir)
        if checkpoints:
            return checkpoints[-1].path
        if missing_ok:
            return None
        raise RunDirError(
            f"resume_from_checkpoint=latest: no complete checkpoint under {Path(output_dir) / CHECKPOINTS_DIR}"
        )
    path = Path(spec)
    if not path.is_dir():
        raise RunDirError(f"resume_from_checkpoint: {path} is not a directory (give a checkpoint dir or 'latest')")
    missing = missing_files(path)
    if missing:
        raise RunDirError(f"resume_from_checkpoint: {path} is not a complete checkpoint: missing {', '.join(missing)}")
    return path


def start_checkpoint(model: str | Path) -> Path:
    """`model=` of a recipe: a model directory as it is, or the final checkpoint of a finished run (how an SFT
    run starts from the CPT run of its sweep cell). A run that stopped before `max_steps` (failed, or still
    training) is refused: its newest checkpoint is not what the experiment meant; name it to use it anyway."""
    path = Path(model)
    if (path / "config.json").is_file() or not (is_run_dir(path) or (path / CHECKPOINTS_DIR).is_dir()):
        return path
    checkpoints = list_checkpoints(path)
    if not checkpoints:
        raise RunDirError(f"model={path} is a run directory without a complete checkpoint under {CHECKPOINTS_DIR}/")
    newest = checkpoints[-1]
    config = yaml.safe_load((path / CONFIG_FILE).read_text()) if is_run_dir(path) else None
    max_steps = config.get("max_steps") if isinstance(config, dict) else None
    if isinstance(max_steps, int) and config.get("epochs") is None and newest.step < max_steps:
        raise RunDirError(
            f"model={path} is a run that has not finished: its newest checkpoint is step {newest.step} of "
            f"max_steps={max_steps} (pass model={newest.path} to start from it anyway)"
        )
    return newest.path


def model_or_final_checkpoint(model: str | Path) -> Path:
    """`model=` of generate.py, evaluate.py and inspect_data.py: a model or checkpoint directory as it is, or a run
    directory's final checkpoint by the recipes' rule (`start_checkpoint`), which is then printed."""
    path = start_checkpoint(model)
    if path != Path(model):
        print(f"model={model} is a run directory: using its final checkpoint {path}", flush=True)
    return path


def prune_checkpoints(output_dir: str | Path, keep_last_n: int) -> list[Path]:
    """Delete all but the newest `keep_last_n` checkpoints; returns the pruned paths. Each is first
    renamed to a hidden name, so a crash mid-delete never leaves a visible half-deleted checkpoint.

    Hidden leftovers of saves that another process started and never finished (a job killed
    mid-save) are removed too: call this only from the one process that writes the run's
    checkpoints (rank 0), never while another job writes into the same output_dir. A folder that
    cannot be deleted yet (on NFS, files still open elsewhere) is logged and retried at the next
    call: pruning never stops a training run."""
    if keep_last_n < 1:
        raise RunDirError(f"keep_last_n must be >= 1, got {keep_last_n}")
    pruned = []
    for ckpt in list_checkpoints(output_dir)[:-keep_last_n]:
        ckpt.path.rename(ckpt.path.with_name(f".{ckpt.path.name}.deleting-{os.getpid()}"))
        pruned.append(ckpt.path)
        log.info("pruned %s (keep_last_n=%d)", ckpt.path, keep_last_n)
    root = Path(output_dir) / CHECKPOINTS_DIR
    epoch_dirs = [d for d in root.iterdir() if _EPOCH_RE.match(d.name) and d.is_dir()] if root.is_dir() else []
    for epoch_dir in epoch_dirs:
        for leftover in sorted(epoch_dir.iterdir()):
            match = _LEFTOVER_RE.match(leftover.name)
            if not match or (match.group(1) == "partial" and int(match.group(2)) == os.getpid()):
                continue  # not ours to delete, or a save of this very process
            if match.group(1) == "partial":
                log.warning("removing %s, left by an interrupted checkpoint save", leftover)
            try:
                shutil.rmtree(leftover)
            except OSError as err:
                log.warning("could not delete %s yet (%s); retrying at the next prune", leftover, err)
        if not any(epoch_dir.iterdir()):
            epoch_dir.rmdir()
    return pruned


def load_training_state(ckpt_dir: str | Path, weights_only: bool = True) -> dict[str, Any]:
    """The non-model entries saved with a checkpoint (optimizer, scheduler, RNG, counters...), on CPU.

    `weights_only=True` (torch's safe loader) accepts tensors and plain Python containers/numbers;
    store e.g. numpy RNG state as a tensor or list, or pass `weights_only=False` for trusted files.
    Read eagerly, not memory-mapped: an optimizer keeps the tensors it is given, and a mapping would
    hold the file open for the whole run (on NFS that blocks pruning the checkpoint)."""
    path = training_state_dir(ckpt_dir) / TRAINING_STATE_FILE
    if not path.is_file():
        raise RunDirError(
            f"{ckpt_dir} has no {TRAINING_STATE_DIR}/{TRAINING_STATE_FILE}: it holds weights only and cannot "
            f"resume a run (start a new run from it with model={ckpt_dir})"
        )
    return torch.load(path, map_location="cpu", weights_only=weights_only)


# --- metric logs -----------------------------------------------------------------------------------------


def read_metrics(run_dir: str | Path) -> dict[int, dict[str, float]]:
    """{step: {metric: value}} over all log files of a run, oldest file first. A last line without its
    newline is being written by a running job and is left out."""
    log_dir = Path(run_dir) / LOGS_DIR
    if not log_dir.is_dir():
        raise FileNotFoundError(f"{run_dir} has no logs/ folder: is it a run directory (output_dir of a recipe)?")
    steps: dict[int, dict[str, float]] = {}
    for path in sorted(log_dir.glob("log_*.txt"), key=lambda p: (p.stat().st_mtime, p.name)):
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as err:
            raise RunDirError(f"{path}: unreadable metric log ({err})") from None
        for number, line in enumerate(text[: text.rfind("\n") + 1].splitlines(), start=1):
            match = _STEP_LINE.match(line)
            if match:
                try:
                    fields = dict(item.split(":", 1) for item in match.group(2).split())
                    steps.setdefault(int(match.group(1)), {}).update({k: float(v) for k, v in fields.items()})
                except ValueError:
                    raise RunDirError(f"{path}:{number}: not a `Step <n> | key:number ...` line: {line!r}") from None
    return steps


def series(metrics: dict[int, dict[str, float]], key: str) -> tuple[list[int], list[float]]:
    """Steps and values of one metric, in step order (steps where it was not logged are left out)."""
    points = sorted((step, values[key]) for step, values in metrics.items() if key in values)
    return [s for s, _ in points], [v for _, v in points]
