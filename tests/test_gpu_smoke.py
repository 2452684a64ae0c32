"""bench/gpu_smoke.sh, the first-GPU-run checklist, runs end to end on the CPU (`--cpu`), so it still works
on the day a GPU is there to run it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_smoke_script_passes_its_cpu_checks(tmp_path) -> None:
    done = subprocess.run(
        ["bash", str(REPO / "bench/gpu_smoke.sh"), "--cpu", str(tmp_path / "smoke")],
        env={**os.environ, "SSI_PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + (tmp_path / "smoke/smoke.log").read_text()[-3000:]
    lines = done.stdout.splitlines()
    assert lines[-1].startswith("gpu_smoke: 16 passed, 0 failed, 2 skipped"), done.stdout
    for check in (
        "CPT packed",
        "new_embeddings, 2 rank(s)",
        "LoRA, 2 rank(s)",
        "resume: same losses",
        "generation (torch) + WER",
        "LoRA checkpoint: fp32, generates",
        "features: LoRA + encoder, 2 rank(s)",
        "features: generation (torch)",
    ):
        assert any(line.startswith("PASS") and check in line for line in lines), (check, done.stdout)
    assert any("base rows bit-identical" in line for line in lines)
