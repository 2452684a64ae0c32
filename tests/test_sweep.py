"""Sweeps of the recipes as Hydra multiruns: a run directory per cell named from its overrides, resume when a sweep
is launched again, a stop signal that ends a local sweep, the CPT -> SFT chain, and the report of the runs. On the
local Slurm cluster: the same sweep through Hydra's submitit launcher, requeued on SIGUSR2 and resumed exactly.

Slurm tests need a running cluster (`snippets/local_slurm.sh start`) and are skipped otherwise. The local cluster
has no accounting and submitit polls only `sacct`, so those tests put a stand-in `sacct` (answering from squeue)
first on the driver's PATH, in the test's own folder; each also runs under a hard timeout.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from hydra.conf import HydraConf
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import OmegaConf

from ssi.eval.scoring import score_generations
from ssi.report.cli import main as report_main
from ssi.run_dir import generations_dir, list_checkpoints, read_metrics
from ssi.train.preemption import EXIT_PREEMPTED
from ssi.train.sweep import MAX_NAME_CHARS, SweepError, SweepJobFailed, SweptKeysAreCells, bind_job, cell_name, end_job

from .slurm_cluster import needs_slurm
from .test_train_recipe import corpus, final_weights, overrides, run  # noqa: F401 (corpus is a fixture)

REPO = Path(__file__).resolve().parents[1]
SACCT_STAND_IN = """#!/usr/bin/env bash
# test-only sacct for a cluster without accounting: job states from squeue (finished jobs stay for MinJobAge)
ids=()
while [ $# -gt 0 ]; do case $1 in -j) ids+=("$2"); shift 2 ;; *) shift ;; esac; done
echo "JobID|State|NodeList"
[ ${#ids[@]} -eq 0 ] || squeue --states=all -h -o "%i|%T|%N" -j "$(IFS=,; echo "${ids[*]}")" 2>/dev/null
"""
SLURM = ["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=0", "hydra.launcher.cpus_per_task=1",
         "hydra.launcher.timeout_min=10", "device=cpu"]  # fmt: skip


def cell_args(kind: str, model: Path, corpus: Path, *extra: str) -> list[str]:  # noqa: F811
    """The training tests' overrides without output_dir (a multirun sets it)."""
    return [a for a in overrides(kind, model, corpus, Path("unused"), *extra) if not a.startswith("output_dir=")]


def sweep_cmd(kind: str, root: Path, *args: str) -> list[str]:
    return [sys.executable, str(REPO / f"recipes/{kind}.py"), "-m", f"hydra.sweep.dir={root}", *args]


def cells(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def steps_of(run_dir: Path) -> list[int]:
    return [c.step for c in list_checkpoints(run_dir)]


def logged(run_dir: Path) -> dict[int, dict[str, float]]:
    return read_metrics(run_dir) if (run_dir / "logs").is_dir() else {}


def run_config(run_dir: Path) -> dict:
    return yaml.safe_load((run_dir / "torchtune_config.yaml").read_text())


def test_cell_names_are_folder_names_that_hydra_reads_back() -> None:
    given = ["data=cpt/synthetic", "data.sequence.dedup=true", "optimizer.lr=1e-4", "optimizer.betas=[0.9,0.95]",
             "model=/abs/models/Llama-3.2-1B-5000-dsus", "output_dir=/x/y", "progress=false", "+extra=a:b"]  # fmt: skip
    digest = hashlib.sha1(b"/abs/models/Llama-3.2-1B-5000-dsus").hexdigest()[:6]
    name = cell_name(given, ["output_dir", "progress"], None, {"data", "size"})
    assert name == (
        "data-cpt.synthetic+data.sequence.dedup-true+extra-a-b+"
        f"model-Llama-3.2-1B-5000-dsus@{digest}+optimizer.betas-0.9_0.95+optimizer.lr-0.0001"
    )
    assert cell_name(given, [], ["data.sequence.dedup", "seed"], set()) == "data.sequence.dedup-true"
    # a checkpoint of a sweep run can be named on any ssi command line without quoting
    (override,) = OverridesParser.create().parse_overrides([f"model=/r/{name}/checkpoints/epoch_0/global_step_2"])
    assert override.value() == f"/r/{name}/checkpoints/epoch_0/global_step_2"
    long = cell_name([f"k{i}=value_{i}" for i in range(40)], [], None, set())
    assert len(long) == MAX_NAME_CHARS and re.search(r"@[0-9a-f]{10}$", long)


def test_a_multirun_names_its_runs_by_the_keys_it_sweeps() -> None:
    def cell_keys(*task: str) -> list[str]:
        config = OmegaConf.create({"hydra": {"overrides": {"task": list(task)}}})
        SweptKeysAreCells().on_multirun_start(config)
        return [o for o in config.hydra.overrides.task if o.startswith("sweep.cell_keys=")]

    assert cell_keys("model=m", "seed=1,2", "optimizer.lr=range(1,3)", "+x=glob(*)") == [
        "sweep.cell_keys=[optimizer.lr,seed,x]"
    ]
    assert cell_keys("model=m", "seed=1") == []  # nothing swept: every override but the non-cell ones
    assert cell_keys("seed=1,2", "sweep.cell_keys=[seed,model]") == ["sweep.cell_keys=[seed,model]"]
    with pytest.raises(SystemExit) as refused:  # two cells would share a run directory
        cell_keys("seed=1,2", "model=a,b", "sweep.cell_keys=[seed]")
    assert refused.value.code == 2


@pytest.mark.slow
def test_local_sweep_runs_each_cell_in_its_own_directory_and_is_reported(
    tiny_extended_dir,
    corpus,  # noqa: F811
    tmp_path,
) -> None:
    root = tmp_path / "sweep"
    args = [*cell_args("cpt", tiny_extended_dir, corpus, "max_steps=4", "save_steps=2", "eval_steps=2"),
            "data.sequence.dedup=true,false"]  # fmt: skip
    done = subprocess.run(sweep_cmd("cpt", root, *args), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = cells(root)
    assert [r.name for r in runs] == ["data.sequence.dedup-false", "data.sequence.dedup-true"]  # the swept key
    for run_dir in runs:
        assert steps_of(run_dir) == [2, 4]
        config = run_config(run_dir)
        assert config["output_dir"] == str(run_dir) and config["resume_from_checkpoint"] == "auto"
        assert config["sweep"]["cell_keys"] == ["data.sequence.dedup"]

    # evaluate every checkpoint (a scored generations file, a benchmark summary), then report the sweep
    for index, run_dir in enumerate(runs):
        for ckpt in list_checkpoints(run_dir):
            out = generations_dir(run_dir, ckpt.epoch, ckpt.step, "synthetic", "test")
            out.mkdir(parents=True)
            hypothesis = "a cat sat" if (index + ckpt.step) % 2 else "the cat sat"
            (out / "generations.jsonl").write_text(
                json.dumps({"id": "u1", "reference": "the cat sat", "text": hypothesis}) + "\n"
            )
            score_generations(out / "generations.jsonl", progress=False)
            bench = run_dir / "evaluations" / f"epoch_{ckpt.epoch}" / f"global_step_{ckpt.step}" / "sblimp"
            bench.mkdir(parents=True)
            (bench / "summary.json").write_text(
                json.dumps({"accuracy": 0.5 + ckpt.step / 100, "n": 10, "categories": {}})
            )
    assert report_main([str(root), "--output", str(tmp_path / "report")]) == 0
    with (tmp_path / "report/report.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and {r["data.sequence.dedup"] for r in rows} == {"true", "false"}
    for row in rows:
        run_dir = root / row["run"]
        wer = json.loads((generations_dir(run_dir, 0, int(row["step"]), "synthetic", "test") / "wer.json").read_text())
        assert (
            float(row["wer/synthetic/test"]) == wer["wer"] and float(row["acc/sblimp"]) == 0.5 + int(row["step"]) / 100
        )
        assert float(row["dev_loss"]) == read_metrics(run_dir)[int(row["step"])]["dev_loss"]
    for png in ("train_loss.png", "dev_loss.png", "wer_synthetic_test.png", "acc_sblimp.png", "losses.png"):
        assert (tmp_path / "report" / png).is_file(), png


def test_multirun_needs_a_sweep_dir(tiny_extended_dir, corpus, tmp_path) -> None:  # noqa: F811
    args = cell_args("cpt", tiny_extended_dir, corpus, "max_steps=1", "seed=1,2")
    no_root = subprocess.run([sys.executable, str(REPO / "recipes/cpt.py"), "-m", *args], capture_output=True,
                             text=True, cwd=tmp_path, timeout=120)  # fmt: skip
    assert no_root.returncode == 2 and not list(tmp_path.iterdir())
    assert (
        no_root.stderr.strip() == "error: a multirun needs hydra.sweep.dir=<root>: each run goes to <root>/<cell name>"
    )


def test_failed_cells_end_the_sweep_with_one_line_each_and_no_traceback(tmp_path, corpus) -> None:  # noqa: F811
    missing = tmp_path / "no_such_model"
    args = cell_args("cpt", missing, corpus, "max_steps=1", "seed=1,2")
    failed = subprocess.run(sweep_cmd("cpt", tmp_path / "sweep", *args), capture_output=True, text=True,
                            timeout=180, env={**os.environ, "HYDRA_FULL_ERROR": ""})  # fmt: skip
    assert failed.returncode == 1 and "Traceback" not in failed.stderr, failed.stderr[-3000:]
    assert str(missing) in failed.stderr  # each cell's own error names the path
    assert "cpt job seed-1 failed with exit code 2" in failed.stderr


@pytest.fixture
def multirun_job(tmp_path: Path):
    """Hydra's state inside job 0 of a multirun whose job directory is tmp_path/root/seed-1."""
    hydra = OmegaConf.structured(HydraConf)
    hydra.mode, hydra.runtime.output_dir, hydra.job.num = RunMode.MULTIRUN, str(tmp_path / "root/seed-1"), 0
    hydra_cfg = OmegaConf.create({"hydra": hydra})
    HydraConfig.instance().set_config(hydra_cfg)
    yield tmp_path / "root/seed-1"
    HydraConfig.instance().cfg = None


def test_a_sweep_job_runs_in_its_job_directory_and_resumes_itself(multirun_job, capsys) -> None:
    cfg = OmegaConf.create({"output_dir": "???", "resume_from_checkpoint": None})
    bind_job(cfg)
    assert cfg.output_dir == str(multirun_job) and cfg.resume_from_checkpoint == "auto"
    for given, message in [
        ({"output_dir": "/runs/one", "resume_from_checkpoint": None}, "output_dir=/runs/one names a single run"),
        ({"output_dir": "???", "resume_from_checkpoint": "/ckpt"}, "every job resumes its own run"),
    ]:
        with pytest.raises(SweepError, match=re.escape(message)):
            bind_job(OmegaConf.create(given))
    assert end_job(0, "cpt") is None  # success: return, the next job runs
    with pytest.raises(SweepJobFailed, match="cpt job seed-1 failed with exit code 2"):
        end_job(2, "cpt")
    with pytest.raises(SystemExit) as stopped:  # a stop signal ends a local sweep: its jobs share this process
        end_job(EXIT_PREEMPTED, "cpt")
    assert stopped.value.code == EXIT_PREEMPTED


@pytest.mark.slow
def test_stop_signal_ends_a_local_sweep_and_launching_it_again_finishes_it_exactly(
    tiny_extended_dir,
    corpus,  # noqa: F811
    tmp_path,
) -> None:
    common = ["save_steps=1000", "eval_steps=1000"]
    run("cpt", overrides("cpt", tiny_extended_dir, corpus, tmp_path / "reference", *common, "max_steps=30"))
    root = tmp_path / "sweep"
    args = [*cell_args("cpt", tiny_extended_dir, corpus, *common), "max_steps=30,2"]  # cells: 30 steps, then 2
    with (tmp_path / "sweep.log").open("w") as log:
        proc = subprocess.Popen(sweep_cmd("cpt", root, *args), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and 3 not in logged(root / "max_steps-30"):
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == EXIT_PREEMPTED
    finally:
        proc.kill()
    (first,) = cells(root)  # the sweep ended with its first job
    assert first.name == "max_steps-30" and 3 <= steps_of(first)[0] < 30
    again = subprocess.run(sweep_cmd("cpt", root, *args), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {r.name: steps_of(r)[-1] for r in cells(root)} == {"max_steps-30": 30, "max_steps-2": 2}
    assert final_weights(first, 30) == final_weights(tmp_path / "reference", 30)


@pytest.mark.slow
def test_cpt_then_sft_per_cell_with_the_chain_snippet(tiny_extended_dir, corpus, tmp_path) -> None:  # noqa: F811
    both = [a for a in cell_args("cpt", tiny_extended_dir, corpus) if a.startswith(("size=", "data.train", "progress"))]
    chain = ["bash", str(REPO / "snippets/sweep_cpt_sft.sh"), str(tmp_path / "m"),
             "--cells", "data.sequence.dedup=true,false", "--both", *both,
             "--cpt", "data=cpt/synthetic", f"model={tiny_extended_dir}", "max_steps=3",
             "--sft", "data=sft/synthetic", "max_steps=2"]  # fmt: skip
    done = subprocess.run(
        chain, capture_output=True, text=True, timeout=300, env={**os.environ, "SSI_PYTHON": sys.executable}
    )
    assert done.returncode == 0, done.stderr[-3000:]
    names = ["data.sequence.dedup-false", "data.sequence.dedup-true"]
    assert [r.name for r in cells(tmp_path / "m/cpt")] == names == [r.name for r in cells(tmp_path / "m/sft")]
    for name in names:
        cpt_last = list_checkpoints(tmp_path / "m/cpt" / name)[-1].path
        sft = run_config(tmp_path / "m/sft" / name)
        assert sft["model"] == str(cpt_last) and sft["data"]["sequence"]["dedup"] == (name.endswith("true"))
        assert steps_of(tmp_path / "m/sft" / name) == [2]
    bad = subprocess.run([*chain[:4], "--cells", "seed=1,2", "--sft", "model=x"], capture_output=True, text=True)
    assert bad.returncode == 2 and "model=x: SFT starts from the cell's CPT run" in bad.stderr


# --- the local Slurm cluster ---------------------------------------------------------------------------------


@pytest.fixture
def driver_env(tmp_path: Path) -> dict[str, str]:
    """The sweep driver's environment: the sacct stand-in first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sacct").write_text(SACCT_STAND_IN)
    (bin_dir / "sacct").chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SSI_PYTHON": sys.executable}


def arrays(root: Path) -> list[str]:
    return (
        sorted(p.name for p in (root / ".submitit").iterdir() if p.name.isdigit())
        if (root / ".submitit").is_dir()
        else []
    )


def cancel(*roots: Path) -> None:
    for root in roots:
        for array in arrays(root):
            subprocess.run(["scancel", array], capture_output=True)


def job_field(job: str, field: str) -> str:
    shown = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    match = re.search(rf"\b{field}=(\S+)", shown)
    return match.group(1) if match else ""


@pytest.mark.slurm
@pytest.mark.slow
@needs_slurm
def test_slurm_sweep_requeues_a_preempted_cell_and_resumes_it_exactly(
    tiny_extended_dir,
    corpus,  # noqa: F811
    tmp_path,
    driver_env,
) -> None:
    common = ["save_steps=1000", "eval_steps=1000"]
    run("cpt", overrides("cpt", tiny_extended_dir, corpus, tmp_path / "reference", *common, "max_steps=30"))
    root = tmp_path / "sweep"
    args = [*SLURM, *cell_args("cpt", tiny_extended_dir, corpus, *common), "max_steps=30,2"]  # array tasks 0 and 1
    with (tmp_path / "driver.log").open("w") as log:
        driver = subprocess.Popen(sweep_cmd("cpt", root, *args), stdout=log, stderr=subprocess.STDOUT, env=driver_env)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and 3 not in logged(root / "max_steps-30"):
            time.sleep(0.5)
        (array,) = arrays(root)
        subprocess.run(["scancel", "--signal=USR2", f"{array}_0"], check=True)  # what --signal=USR2@300 delivers
        assert driver.wait(timeout=300) == 0, (tmp_path / "driver.log").read_text()[-3000:]
    finally:
        driver.kill()
        cancel(root)
    first, second = root / "max_steps-30", root / "max_steps-2"
    job_log = next((root / ".submitit").glob(f"{array}_0/*_log.out")).read_text()
    assert job_field(f"{array}_0", "Restarts") == "1", job_log[-3000:]
    assert "handing SIGUSR2 over to submitit" in job_log and "Requeued job" in job_log and "resumed " in job_log
    stopped, final = steps_of(first)
    assert 3 <= stopped < 30 and final == 30 and steps_of(second) == [2]
    assert final_weights(first, 30) == final_weights(tmp_path / "reference", 30)
    assert report_main([str(root), "--output", str(tmp_path / "report"), "--no-plots"]) == 0


@pytest.mark.slurm
@pytest.mark.slow
@needs_slurm
def test_slurm_chain_starts_each_sft_cell_after_its_cpt_cell(tiny_extended_dir, corpus, tmp_path, driver_env) -> None:  # noqa: F811
    both = [a for a in cell_args("cpt", tiny_extended_dir, corpus) if a.startswith(("size=", "data.train", "progress"))]
    chain = ["bash", str(REPO / "snippets/sweep_cpt_sft.sh"), str(tmp_path / "m"), "--cells", "seed=1,2",
             "--both", *SLURM, *both, "--cpt", "data=cpt/synthetic", f"model={tiny_extended_dir}", "max_steps=3",
             "--sft", "data=sft/synthetic", "max_steps=2"]  # fmt: skip
    try:
        done = subprocess.run(chain, capture_output=True, text=True, timeout=400, env=driver_env)
    finally:
        cancel(tmp_path / "m/cpt", tmp_path / "m/sft")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    (cpt_array,), (sft_array,) = arrays(tmp_path / "m/cpt"), arrays(tmp_path / "m/sft")
    submission = (tmp_path / f"m/sft/.submitit/{sft_array}/{sft_array}_submission.sh").read_text()
    assert f"--dependency=aftercorr:{cpt_array}" in submission and "--kill-on-invalid-dep=yes" in submission
    for seed in (1, 2):
        sft = run_config(tmp_path / f"m/sft/seed-{seed}")
        assert sft["model"] == str(list_checkpoints(tmp_path / f"m/cpt/seed-{seed}")[-1].path)
        assert sft["seed"] == seed and steps_of(tmp_path / f"m/sft/seed-{seed}") == [2]
