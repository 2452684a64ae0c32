"""Real Slurm: the documented sbatch snippet checkpoints on the pre-timeout signal, requeues itself,
resumes from `latest` and ends with the uninterrupted run's weights.

Needs a running cluster (`.ci/run` starts one with snippets/local_slurm.sh); otherwise skipped with the reason.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ssi.run_dir import read_metrics as metrics

from .slurm_cluster import needs_slurm
from .test_train_recipe import corpus, final_weights, overrides, run  # noqa: F401 (corpus is a fixture)

REPO = Path(__file__).resolve().parents[1]


pytestmark = [
    pytest.mark.slurm,
    pytest.mark.slow,
    needs_slurm,
]


def job_field(job: str, field: str) -> str:
    shown = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    match = re.search(rf"\b{field}=(\S+)", shown)
    return match.group(1) if match else ""


def test_sbatch_snippet_survives_preemption(tiny_extended_dir, corpus, tmp_path) -> None:  # noqa: F811
    common = ["max_steps=30", "save_steps=1000", "eval_steps=1000"]
    run("cpt", overrides("cpt", tiny_extended_dir, corpus, tmp_path / "reference", *common))

    out = tmp_path / "slurm-run"
    args = overrides("cpt", tiny_extended_dir, corpus, out, *common)
    submit = subprocess.run(
        ["sbatch", "--parsable", "--gpus-per-node=0", "--cpus-per-task=1", f"--output={tmp_path}/slurm-%j.out",
         str(REPO / "snippets/train.sbatch"),
         "cpt", str(out), *[a for a in args if not a.startswith("output_dir=")]],
        cwd=REPO, env={**os.environ, "SSI_PYTHON": sys.executable}, capture_output=True, text=True, check=True,
    )  # fmt: skip
    job = submit.stdout.strip().split(";")[0]
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and 3 not in (metrics(out) if (out / "logs").is_dir() else {}):
            time.sleep(0.5)
        assert 3 in metrics(out), f"job {job} did not reach step 3: {job_field(job, 'JobState')}"
        subprocess.run(["scancel", "--signal=USR1", job], check=True)  # what --signal=USR1@300 delivers
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and job_field(job, "JobState") not in ("COMPLETED", "FAILED", "CANCELLED"):
            time.sleep(1)
        log = (tmp_path / f"slurm-{job}.out").read_text()
        assert job_field(job, "JobState") == "COMPLETED", log[-3000:]
        assert job_field(job, "Restarts") == "1", log[-3000:]
    finally:
        subprocess.run(["scancel", job], capture_output=True)
    assert "requeueing job" in log and "resumed " in log
    steps = sorted(int(p.name.removeprefix("global_step_")) for p in out.glob("checkpoints/epoch_*/global_step_*"))
    assert len(steps) == 2 and 3 <= steps[0] < 30 and steps[1] == 30, steps
    assert final_weights(out, 30) == final_weights(tmp_path / "reference", 30)


def test_srun_tasks_form_one_process_group(tiny_extended_dir, corpus, tmp_path) -> None:  # noqa: F811
    # two srun tasks (no torchrun) train like one process with the same global batch of 8
    common = ["max_steps=4", "save_steps=1000", "eval_steps=1000"]
    run("cpt", overrides("cpt", tiny_extended_dir, corpus, tmp_path / "one", *common))
    args = overrides("cpt", tiny_extended_dir, corpus, tmp_path / "srun", *common, "gradient_accumulation_steps=1")
    done = subprocess.run(["srun", "-n2", "--cpus-per-task=1", sys.executable, str(REPO / "recipes/cpt.py"), *args],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank 1/2 joined the gloo process group" in done.stdout + done.stderr  # Hydra logs to stdout
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "srun")
    for step in range(1, 5):
        assert two[step]["loss"] == pytest.approx(one[step]["loss"], abs=1e-4)
