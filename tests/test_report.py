"""scripts/report.py on synthetic run trees: a row per run and checkpoint step with the values of the run's files,
the settings that differ as columns, the best checkpoint, plots, what is missing, bad input, and runs left as
they were. The report of real sweep runs is in tests/test_sweep.py."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ssi import run_dir
from ssi.report.cli import main
from ssi.report.runs import read_run
from ssi.report.synthetic import run_config, write_run, write_sweep

REPO = Path(__file__).resolve().parents[1]
STEPS = [100, 200, 300, 400, 500]


@pytest.fixture(scope="module")
def config() -> dict:
    """A resolved SFT run config, as the recipe writes it into torchtune_config.yaml."""
    return run_config("/models/Llama-3.2-tiny-300-dsus")


def snapshot(root: Path) -> dict[str, tuple[int, str]]:
    """Every file and folder under root with its mtime and content hash."""
    found = {}
    for path in sorted(root.rglob("*")):
        digest = hashlib.sha1(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        found[str(path)] = (path.stat().st_mtime_ns, digest)
    return found


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def report(*args: str | Path) -> int:
    return main([str(a) for a in args])


def test_report_of_a_sweep_has_a_row_per_checkpoint_and_the_differing_settings(config, tmp_path, capsys) -> None:
    cells = [{"data.sequence.dedup": dedup, "seed": seed} for dedup in (True, False) for seed in (1, 2)]
    runs = write_sweep(tmp_path / "sweep", config, cells, STEPS)
    before = snapshot(tmp_path / "sweep")
    out = tmp_path / "report"
    assert report(tmp_path / "sweep", "--output", out) == 0
    assert "report of 4 runs, 20 checkpoint steps in" in capsys.readouterr().out
    assert snapshot(tmp_path / "sweep") == before  # reading never writes into runs

    rows = read_csv(out / "report.csv")
    assert len(rows) == 4 * len(STEPS)
    header = list(rows[0])
    assert header[:5] == ["run", "step", "epoch", "train_loss", "dev_loss"]
    for column in ("wer/synthetic/test", "wer/synthetic/validation", "acc/sblimp", "acc/sblimp/a", "best"):
        assert column in header, column
    assert [c for c in header if c in ("data.sequence.dedup", "seed", "output_dir", "model", "init")] == [
        "seed",
        "data.sequence.dedup",
    ]  # the settings that differ, and only those
    for row in rows:
        run = runs[int(row["run"].removeprefix("cell-"))]
        step_dirs = f"epoch_0/global_step_{row['step']}"
        wer = json.loads((run / "generations" / step_dirs / "synthetic/test/wer.json").read_text())["wer"]
        acc = json.loads((run / "evaluations" / step_dirs / "sblimp/summary.json").read_text())["accuracy"]
        assert float(row["wer/synthetic/test"]) == wer and float(row["acc/sblimp"]) == acc
        logged = run_dir.read_metrics(run)[int(row["step"])]
        assert float(row["train_loss"]) == logged["loss"] and float(row["dev_loss"]) == logged["dev_loss"]
        assert row["checkpoint"] == str((run / "checkpoints" / step_dirs).resolve())
    # default selection: the dev WER (the validation split), U-shaped in the synthetic runs: best in the middle
    assert {row["step"] for row in rows if row["best"] == "true"} == {"300"}
    assert sum(row["best"] == "true" for row in rows) == 4

    md = (out / "report.md").read_text()
    assert "selected by the run's dev WER" in md
    for title in ("## Train loss", "## Dev loss", "## WER (%) on synthetic/test", "## Accuracy (%) on sblimp"):
        assert title in md, title
    assert "| run | seed | data.sequence.dedup | step 100 | step 200 | step 300 | step 400 | step 500 |" in md
    assert "**20.00**" in md  # the best checkpoint's WER, in bold
    for png in ("train_loss.png", "dev_loss.png", "wer_synthetic_test.png", "acc_sblimp.png", "losses.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        assert f"]({png})" in md
    assert "Nothing: every checkpoint has every result." in md


def test_select_by_picks_by_any_metric_and_refuses_unknown_ones(config, tmp_path, capsys) -> None:
    write_sweep(tmp_path / "sweep", config, [{"seed": 1}, {"seed": 2}], STEPS)
    assert report(tmp_path / "sweep", "--output", tmp_path / "acc", "--select-by", "acc/sblimp", "--no-plots") == 0
    rows = read_csv(tmp_path / "acc/report.csv")
    assert {r["step"] for r in rows if r["best"] == "true"} == {"500"}  # accuracy: higher is better
    assert not list((tmp_path / "acc").glob("*.png"))
    assert report(tmp_path / "sweep", "--output", tmp_path / "loss", "--select-by", "dev_loss", "--no-plots") == 0
    assert {r["step"] for r in read_csv(tmp_path / "loss/report.csv") if r["best"] == "true"} == {"500"}
    capsys.readouterr()
    assert report(tmp_path / "sweep", "--output", tmp_path / "x", "--select-by", "wer/other/test") == 2
    err = capsys.readouterr().err
    assert "--select-by wer/other/test: no run has that metric; available: dev_wer, train_loss" in err
    assert not (tmp_path / "x").exists()


def test_runs_in_progress_are_read_as_they_are_and_what_is_missing_is_listed(config, tmp_path) -> None:
    run = write_run(tmp_path / "run", config, STEPS[:3], benchmarks=("sblimp", "blimp"))
    ckpts = tmp_path / "run/checkpoints/epoch_0"
    (ckpts / ".global_step_400.partial-123").mkdir()  # a checkpoint being written
    with (run / "logs/log_1000.txt").open("a") as log:
        log.write("Step 301 | loss:2.9 lr:")  # a log line being written
    run_dir.generations_dir(run, 0, 300, "synthetic", "test").joinpath("wer.json").unlink()  # not scored yet
    for step in (200, 300):  # one benchmark evaluated at the first checkpoint only
        (run_dir.evaluations_dir(run, 0, step, "blimp") / "summary.json").unlink()
        run_dir.evaluations_dir(run, 0, step, "blimp").rmdir()
    extra = run_dir.checkpoint_dir(run, 0, 350)  # a checkpoint without generations
    extra.mkdir(parents=True)
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "original/tokenizer.model", "ssi.json", "model.safetensors"):  # fmt: skip
        (extra / name).parent.mkdir(parents=True, exist_ok=True)
        (extra / name).write_text("{}" if name == "ssi.json" else "")
    results = read_run(run)
    assert [row.step for row in results.steps] == [100, 200, 300, 350]
    assert results.problems == [] and max(results.log) == 300
    assert results.status == f"at step 300 of {config['max_steps']}"
    missing = "\n".join(results.missing)
    assert "no generations at step 350" in missing
    assert "acc/blimp missing at steps 200, 300, 350" in missing
    assert "wer/synthetic/test missing at steps 300, 350" in missing
    assert "synthetic/test: generations without wer.json (not scored)" in missing

    assert report(run, "--output", tmp_path / "report") == 0
    md = (tmp_path / "report/report.md").read_text()
    assert "no generations at step 350" in md and "at step 300 of" in md


def test_bases_differ_then_base_model_is_a_column_and_sft_from_cpt_shows_its_start(config, tmp_path) -> None:
    cpt = write_run(tmp_path / "cpt", config, [100], manifest={"base_model": "Llama-3.2-1B", "n_dsus": 5000})
    sft_config = {**config, "model": str(cpt / "checkpoints/epoch_0/global_step_100")}
    write_run(tmp_path / "sft", sft_config, [100], manifest={"base_model": "Llama-3.2-1B", "n_dsus": 5000})
    write_run(tmp_path / "other", config, [100], manifest={"base_model": "Llama-3.2-3B", "n_dsus": 5000})
    assert report(tmp_path / "cpt", tmp_path / "sft", tmp_path / "other", "--output", tmp_path / "r") == 0
    rows = {r["run"]: r for r in read_csv(tmp_path / "r/report.csv")}
    assert rows["other"]["base_model"] == "Llama-3.2-3B" and rows["cpt"]["base_model"] == "Llama-3.2-1B"
    assert "n_dsus" not in rows["cpt"]  # the same in every run
    assert rows["sft"]["init"] == f"{cpt.resolve()}@100"
    md = (tmp_path / "r/report.md").read_text()
    assert "| sft | Llama-3.2-1B | cpt@100 |" in md  # another run of the report is named by its label


def test_bad_input_is_one_line_naming_the_path_and_changes_nothing(config, tmp_path, capsys) -> None:
    run = write_run(tmp_path / "runs/a", config, [100, 200])
    write_run(tmp_path / "runs/b", config, [100])
    (tmp_path / "empty").mkdir()
    cases = [
        ([tmp_path / "nowhere"], f"{tmp_path / 'nowhere'} is not a directory"),
        (
            [tmp_path / "empty"],
            f"{tmp_path / 'empty'} is not a run directory (no torchtune_config.yaml) and holds none",
        ),
        ([run, "--output", run / "report"], f"is inside the run directory {run}: reports never write into runs"),
    ]
    for args, message in cases:
        capsys.readouterr()
        assert report(*args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err

    wer = run_dir.generations_dir(run, 0, 200, "synthetic", "test") / "wer.json"
    wer.write_text("{not json")
    summary = run_dir.evaluations_dir(run, 0, 100, "sblimp") / "summary.json"
    summary.write_text(json.dumps({"n": 3}))
    before = snapshot(tmp_path / "runs")
    assert report(tmp_path / "runs", "--output", tmp_path / "r") == 2
    err = capsys.readouterr().err
    assert f"error: {wer} is not valid JSON" in err and f"error: {summary}: no `accuracy` field" in err
    assert "pass --skip-unreadable" in err and not (tmp_path / "r").exists()
    assert report(tmp_path / "runs", "--output", tmp_path / "r", "--skip-unreadable") == 0
    md = (tmp_path / "r/report.md").read_text()
    assert "## Unreadable files (left out)" in md and str(wer) in md
    assert snapshot(tmp_path / "runs") == before
    capsys.readouterr()
    assert report(tmp_path / "runs", "--output", tmp_path / "r", "--skip-unreadable") == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert report(tmp_path / "runs", "--output", tmp_path / "r", "--skip-unreadable", "--overwrite") == 0


def test_many_runs_and_checkpoints_switch_to_best_and_last_columns(config, tmp_path) -> None:
    steps = list(range(50, 1050, 50))
    write_sweep(tmp_path / "sweep", config, [{"seed": i} for i in range(40)], steps)
    assert report(tmp_path / "sweep", "--output", tmp_path / "r", "--no-plots") == 0
    assert len(read_csv(tmp_path / "r/report.csv")) == 40 * len(steps)
    md = (tmp_path / "r/report.md").read_text()
    assert "| run | seed | best checkpoint | last |" in md
    assert "(step 550)" in md and "(step 1000)" in md


def test_script_runs_as_documented_on_a_chain_root(config, tmp_path) -> None:
    for stage in ("cpt", "sft"):  # a chain's root: ROOT/cpt/<cell>, ROOT/sft/<cell> (and Slurm's hidden logs)
        write_sweep(tmp_path / "m" / stage, config, [{"seed": 1}, {"seed": 2}], STEPS[:2])
        (tmp_path / "m" / stage / ".submitit/7_0").mkdir(parents=True)
    done = subprocess.run([sys.executable, str(REPO / "scripts/report.py"), str(tmp_path / "m"), "--output",
                           str(tmp_path / "r")], capture_output=True, text=True, env={**os.environ})  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith(f"{tmp_path / 'r' / 'report.md'}")
    assert sorted({row["run"] for row in read_csv(tmp_path / "r/report.csv")}) == [
        "cpt/cell-0",
        "cpt/cell-1",
        "sft/cell-0",
        "sft/cell-1",
    ]
