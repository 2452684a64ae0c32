"""`make demo` at a reduced size: the whole loop runs through the real entry points, WER improves and the
likelihood benchmark goes from chance to clearly above it."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_demo_pipeline_learns(tmp_path) -> None:
    out = tmp_path / "demo"
    cmd = [
        sys.executable,
        str(REPO / "scripts/demo.py"),
        "--out",
        str(out),
        "--cpt_steps",
        "100",
        "--sft_steps",
        "500",
        "--n_train",
        "1000",
        "--n_test",
        "60",
        "--backend",  # generate.py's vLLM path has its own tests; torch gives the same greedy tokens
        "torch",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "ssi demo summary" in done.stdout
    before = json.loads(next((out / "generations/untrained").rglob("wer.json")).read_text())
    after = json.loads(next((out / "runs/sft/generations").rglob("wer.json")).read_text())
    assert before["wer"] > 0.9, before
    assert after["wer"] < 0.5 * before["wer"], (before["wer"], after["wer"])
    accuracy = {
        name: json.loads(next(folder.rglob("summary.json")).read_text())["accuracy"]
        for name, folder in (("untrained", out / "evaluations/untrained"), ("cpt", out / "runs/cpt/evaluations"))
    }
    assert accuracy["untrained"] <= 0.75 and accuracy["cpt"] >= 0.85, accuracy
    assert "Benchmark accuracy on the synthetic test split (60 items" in done.stdout
    assert f"after CPT                      : {100 * accuracy['cpt']:6.1f}%" in done.stdout
    assert (out / "losses.png").read_bytes()[:4] == b"\x89PNG"
    with open(out / "report/report.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {row["run"] for row in rows} == {"cpt", "sft"}, rows
    assert (out / "report/report.md").is_file() and f"report     {out / 'report/report.md'}" in done.stdout
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 2 and "exists (a previous demo?)" in again.stderr
