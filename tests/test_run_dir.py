"""The run-directory layout: listing, resolving and pruning checkpoints, never trusting a half-written one."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import ssi.run_dir as run_dir_mod
from ssi.model.checkpointer import SpeechCheckpointer
from ssi.run_dir import RunDirError, list_checkpoints, load_training_state, prune_checkpoints, resolve_checkpoint


def test_killed_save_never_looks_complete(tiny_extended_dir: Path, tmp_path: Path) -> None:
    """SIGKILL in the middle of a save (no cleanup code runs): the half-written checkpoint stays under
    a hidden name, `latest` still resolves to the previous complete checkpoint, and pruning clears it."""
    run = tmp_path / "run"
    checkpointer = SpeechCheckpointer(tiny_extended_dir, run, progress=False)
    previous = checkpointer.save_checkpoint(checkpointer.load_checkpoint(), epoch=0, step=1)
    ready = tmp_path / "ready"
    script = textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        from ssi.model.checkpointer import SpeechCheckpointer
        c = SpeechCheckpointer({str(tiny_extended_dir)!r}, {str(run)!r}, progress=False)
        def stall(state_dir):
            Path({str(ready)!r}).touch()
            time.sleep(120)
        c.save_checkpoint({{**c.load_checkpoint(), "global_step": 2}}, 0, step=2, training_state_writer=stall)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 90
        while not ready.exists():
            assert proc.poll() is None, "the saving process exited before reaching the hook"
            assert time.monotonic() < deadline, "the saving process never reached the hook"
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    epoch_dir = run / "checkpoints" / "epoch_0"
    leftovers = [p.name for p in epoch_dir.iterdir() if p.name != "global_step_1"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".global_step_2.partial-")
    assert (epoch_dir / leftovers[0] / "model.safetensors").is_file()  # it really was mid-save
    assert not (epoch_dir / "global_step_2").exists()
    assert resolve_checkpoint(run, "latest") == previous
    with pytest.raises(RunDirError, match="not a complete checkpoint"):
        resolve_checkpoint(run, epoch_dir / leftovers[0] / "training_state")
    # the next job's pruning clears the leftover and keeps the complete checkpoint
    assert prune_checkpoints(run, keep_last_n=1) == []
    assert sorted(p.name for p in epoch_dir.iterdir()) == ["global_step_1"]


# --- run directory helpers --------------------------------------------------------------------------


def test_resolve_latest_and_prune(tiny_extended_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    with pytest.raises(RunDirError, match="no complete checkpoint"):
        resolve_checkpoint(run, "latest")
    assert resolve_checkpoint(run, "latest", missing_ok=True) is None
    checkpointer = SpeechCheckpointer(tiny_extended_dir, run, progress=False)
    state = checkpointer.load_checkpoint()
    # step order, not name or epoch order: global_step_10 is newer than global_step_9
    for epoch, step in [(0, 5), (0, 9), (1, 10), (1, 20)]:
        checkpointer.save_checkpoint(state, epoch=epoch, step=step)
    (run / "checkpoints" / "epoch_1" / "notes.txt").write_text("not a checkpoint")
    assert [(c.epoch, c.step) for c in list_checkpoints(run)] == [(0, 5), (0, 9), (1, 10), (1, 20)]
    assert resolve_checkpoint(run, "latest") == checkpointer.checkpoint_path(1, 20)
    explicit = checkpointer.checkpoint_path(0, 9)
    assert resolve_checkpoint(run, str(explicit)) == explicit

    removed = prune_checkpoints(run, keep_last_n=2)
    assert removed == [checkpointer.checkpoint_path(0, 5), checkpointer.checkpoint_path(0, 9)]
    assert not (run / "checkpoints" / "epoch_0").exists()  # emptied epoch folder removed
    assert [(c.epoch, c.step) for c in list_checkpoints(run)] == [(1, 10), (1, 20)]
    assert prune_checkpoints(run, keep_last_n=2) == []
    with pytest.raises(RunDirError, match="keep_last_n must be >= 1"):
        prune_checkpoints(run, keep_last_n=0)


def test_prune_defers_what_it_cannot_delete_yet(
    tiny_extended_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On NFS a checkpoint whose files are still open elsewhere cannot be removed: training goes on,
    the checkpoint is already out of sight, and the next prune finishes the job."""
    run = tmp_path / "run"
    checkpointer = SpeechCheckpointer(tiny_extended_dir, run, progress=False)
    state = checkpointer.load_checkpoint()
    old, new = (checkpointer.save_checkpoint(state, epoch=0, step=s) for s in (1, 2))
    real_rmtree = shutil.rmtree

    def busy(path: Path, *args: object, **kwargs: object) -> None:
        raise OSError(39, "Directory not empty", str(path))

    monkeypatch.setattr(run_dir_mod.shutil, "rmtree", busy)
    assert prune_checkpoints(run, keep_last_n=1) == [old]
    assert [c.path for c in list_checkpoints(run)] == [new]
    hidden = [p.name for p in old.parent.iterdir() if p.name.startswith(".")]
    assert len(hidden) == 1 and hidden[0].startswith(".global_step_1.deleting-")
    monkeypatch.setattr(run_dir_mod.shutil, "rmtree", real_rmtree)
    assert prune_checkpoints(run, keep_last_n=1) == []
    assert sorted(p.name for p in old.parent.iterdir()) == ["global_step_2"]


def test_damaged_checkpoint_is_skipped_by_latest(tiny_extended_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    checkpointer = SpeechCheckpointer(tiny_extended_dir, run, progress=False)
    state = checkpointer.load_checkpoint()
    good = checkpointer.save_checkpoint(state, epoch=0, step=1)
    damaged = checkpointer.save_checkpoint(state, epoch=0, step=2)
    (damaged / "model.safetensors").unlink()
    assert resolve_checkpoint(run, "latest") == good
    with pytest.raises(RunDirError, match=r"not a complete checkpoint: missing model\.safetensors"):
        resolve_checkpoint(run, damaged)
    with pytest.raises(RunDirError, match="is not a directory"):
        resolve_checkpoint(run, run / "nope")
    with pytest.raises(RunDirError, match="cannot resume a run"):
        load_training_state(good)


def test_results_are_listed_by_step_and_outputs_being_written_are_not(tmp_path: Path) -> None:
    run = tmp_path / "run"
    for step, dataset, split in [(20, "mls", "test"), (5, "mls", "test"), (5, "mls", "validation")]:
        run_dir_mod.generations_dir(run, 0, step, dataset, split).mkdir(parents=True)
    (run / "generations/epoch_0/global_step_20/mls/.test.partial-12").mkdir()  # being written
    (run / "generations/epoch_0/.global_step_30.partial-12").mkdir()
    run_dir_mod.evaluations_dir(run, 1, 20, "sblimp").mkdir(parents=True)
    (run / "evaluations/epoch_1/global_step_20/.blimp.partial-3").mkdir()
    assert [(o.step, o.name) for o in run_dir_mod.list_generations(run)] == [
        (5, "mls/test"),
        (5, "mls/validation"),
        (20, "mls/test"),
    ]
    (evaluation,) = run_dir_mod.list_evaluations(run)
    assert (evaluation.epoch, evaluation.step, evaluation.name) == (1, 20, "sblimp")
    assert evaluation.path == run / "evaluations/epoch_1/global_step_20/sblimp"
    assert run_dir_mod.list_evaluations(tmp_path / "nothing") == []


def test_a_run_directory_as_model_means_its_newest_checkpoint(tiny_extended_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / run_dir_mod.CONFIG_FILE).write_text("model: x\n")
    with pytest.raises(RunDirError, match=f"model={run} is a run directory without a complete checkpoint"):
        run_dir_mod.start_checkpoint(run)
    checkpointer = SpeechCheckpointer(tiny_extended_dir, run, progress=False)
    for step in (3, 12):
        checkpointer.save_checkpoint(checkpointer.load_checkpoint(), epoch=0, step=step)
    assert run_dir_mod.start_checkpoint(run) == checkpointer.checkpoint_path(0, 12)
    (run / run_dir_mod.CONFIG_FILE).write_text("max_steps: 20\nepochs: null\n")  # failed, or still training
    with pytest.raises(
        RunDirError, match=r"is a run that has not finished: its newest checkpoint is step 12 of max_st"
    ):
        run_dir_mod.start_checkpoint(run)
    (run / run_dir_mod.CONFIG_FILE).write_text("max_steps: 12\nepochs: null\n")
    assert run_dir_mod.start_checkpoint(run) == checkpointer.checkpoint_path(0, 12)
    assert run_dir_mod.start_checkpoint(tiny_extended_dir) == tiny_extended_dir  # a model directory as it is
    assert run_dir_mod.start_checkpoint(checkpointer.checkpoint_path(0, 3)) == checkpointer.checkpoint_path(0, 3)


def test_metric_logs_of_a_running_job_and_damaged_ones(tmp_path: Path) -> None:
    logs = tmp_path / "run/logs"
    logs.mkdir(parents=True)
    (logs / "log_1.txt").write_text("Step 1 | loss:2.5 lr:0.1 \nStep 2 | loss:2.25 \nStep 3 | loss:2.")
    assert run_dir_mod.read_metrics(tmp_path / "run") == {1: {"loss": 2.5, "lr": 0.1}, 2: {"loss": 2.25}}
    (logs / "log_1.txt").write_text("Step 1 | loss:2.5 \nStep 2 | loss:oops \n")
    with pytest.raises(RunDirError, match=r"log_1.txt:2: not a `Step <n> \| key:number ...` line"):
        run_dir_mod.read_metrics(tmp_path / "run")
