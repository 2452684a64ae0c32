"""Checkpoints of a frozen base share its unchanged weight files (hard links to one copy per run) and stay
complete model directories: transformers reads each, after pruning another, and after a copy elsewhere."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import ssi.model.checkpointer as ckpt_mod
from ssi.files import read_json
from ssi.hf_dir import weight_files
from ssi.model.checkpointer import SpeechCheckpointer
from ssi.run_dir import frozen_weights_dir, prune_checkpoints
from ssi.vocab.extend import extend_model_dir

EMBED = "model.embed_tokens.weight"


@pytest.fixture(scope="module")
def untied_extended_dir(untied_base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bf16, untied output head, sharded over several files, 300 DSUs."""
    return extend_model_dir(untied_base_dir, tmp_path_factory.mktemp("untied-ext") / "ext", 300, progress=False)


def hf_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every weight as transformers reads it (a model dir with an index or one file)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def file_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in weight_files(model_dir):
        with safe_open(path, framework="pt") as f:
            tensors |= {k: f.get_tensor(k).clone() for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    return tensors


def new_rows_trained(state: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
    """trainable=new_embeddings: only the embedding (and output) rows change."""
    changed = dict(state)
    for name in ("tok_embeddings.weight", "output.weight"):
        if name in changed:
            changed[name] = changed[name].clone()
            changed[name][-10:] += 0.01 * step
    return changed


def test_projector_checkpoints_link_one_copy_of_the_frozen_llm(tiny_extended_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    checkpointer = SpeechCheckpointer(tiny_extended_dir, run, progress=False)
    state = checkpointer.load_checkpoint()
    first = checkpointer.save_checkpoint(state, epoch=0, step=1)
    second = checkpointer.save_checkpoint(state, epoch=0, step=2)
    (weights,) = weight_files(second)
    assert weights.stat().st_ino == weight_files(first)[0].stat().st_ino
    assert weights.stat().st_nlink == 3  # two checkpoints and the run's copy
    (copy,) = frozen_weights_dir(run).iterdir()
    assert copy.stat().st_ino == weights.stat().st_ino
    assert not weights.stat().st_mode & 0o222  # read-only: writing into one checkpoint's file would change all
    # a resumed run (a new checkpointer on the same base) links the same copy
    third = SpeechCheckpointer(tiny_extended_dir, run, progress=False).save_checkpoint(state, epoch=0, step=3)
    assert weight_files(third)[0].stat().st_ino == weights.stat().st_ino
    expected = hf_tensors(first)

    # pruning the first checkpoint leaves the second complete, with identical tensors
    assert prune_checkpoints(run, keep_last_n=2) == [first]
    assert not first.exists()
    after = hf_tensors(second)
    assert after.keys() == expected.keys()
    assert all(torch.equal(after[k], expected[k]) for k in expected)

    # cp -r makes a full, independent copy: it loads, and no longer shares the run's file
    elsewhere = tmp_path / "elsewhere" / "ckpt"
    shutil.copytree(second, elsewhere)
    (copied,) = weight_files(elsewhere)
    assert copied.stat().st_nlink == 1 and copied.stat().st_ino != weights.stat().st_ino
    shutil.rmtree(run)
    loaded = hf_tensors(elsewhere)
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)


def test_new_embeddings_share_every_shard_but_the_trained_rows(untied_extended_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    checkpointer = SpeechCheckpointer(untied_extended_dir, run, max_shard_size="200KB", progress=False)
    state = checkpointer.load_checkpoint()["model"]
    states = {step: new_rows_trained(state, step) for step in (1, 2)}
    saved = {step: checkpointer.save_checkpoint({"model": s}, epoch=0, step=step) for step, s in states.items()}
    trained = {EMBED: "tok_embeddings.weight", "lm_head.weight": "output.weight"}
    source = file_tensors(untied_extended_dir)
    for step, ckpt in saved.items():
        index = read_json(ckpt / "model.safetensors.index.json")["weight_map"]
        trained_files = {index[name] for name in trained}
        assert not trained_files & {f for n, f in index.items() if n not in trained}  # shards of their own
        links = {f: (ckpt / f).stat().st_nlink for f in set(index.values())}
        assert {f: links[f] for f in trained_files} == dict.fromkeys(trained_files, 1)
        assert all(n == 3 for f, n in links.items() if f not in trained_files)  # two checkpoints + the run's copy
        written = file_tensors(ckpt)
        assert written.keys() == source.keys()
        for name, tensor in written.items():
            want = states[step][trained[name]] if name in trained else source[name]
            assert tensor.dtype == want.dtype and torch.equal(tensor, want), name
    assert prune_checkpoints(run, keep_last_n=1) == [saved[1]]
    after = hf_tensors(saved[2])
    assert torch.equal(after["model.norm.weight"], source["model.norm.weight"].float())
    assert torch.equal(after["lm_head.weight"], states[2]["output.weight"].float())


def test_full_training_shares_nothing(tiny_extended_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    checkpointer = SpeechCheckpointer(tiny_extended_dir, run, progress=False)
    state = checkpointer.load_checkpoint()["model"]
    saved = []
    for step in (1, 2):
        changed = {k: v + 0.001 * step for k, v in state.items()}
        saved.append(checkpointer.save_checkpoint({"model": changed}, epoch=0, step=step))
    assert [weight_files(c)[0].stat().st_nlink for c in saved] == [1, 1]
    assert not frozen_weights_dir(run).exists()


def test_failed_save_leaves_no_shared_copy(tiny_extended_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    checkpointer = SpeechCheckpointer(tiny_extended_dir, run, progress=False)
    state = checkpointer.load_checkpoint()

    def fail(folder: Path) -> None:
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        checkpointer.save_checkpoint(state, epoch=0, step=1, files_writer=fail)
    assert not frozen_weights_dir(run).exists()
    saved = checkpointer.save_checkpoint(state, epoch=0, step=2)
    assert weight_files(saved)[0].stat().st_nlink == 2


def test_unlinkable_copy_is_copied(tiny_extended_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another filesystem (os.link fails with EXDEV): the later checkpoint gets a full copy, and loads."""
    run = tmp_path / "run"
    checkpointer = SpeechCheckpointer(tiny_extended_dir, run, progress=False)
    state = checkpointer.load_checkpoint()
    first = checkpointer.save_checkpoint(state, epoch=0, step=1)

    def no_link(src: object, dst: object) -> None:
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(ckpt_mod.os, "link", no_link)
    second = checkpointer.save_checkpoint(state, epoch=0, step=2)
    assert weight_files(second)[0].stat().st_nlink == 1
    assert weight_files(second)[0].read_bytes() == weight_files(first)[0].read_bytes()


def test_a_model_in_one_file_is_shared_only_whole(tiny_extended_dir: Path, tmp_path: Path) -> None:
    """Below max_shard_size the layout stays one model.safetensors: new rows trained, nothing is shared."""
    checkpointer = SpeechCheckpointer(tiny_extended_dir, tmp_path / "run", progress=False)
    state = checkpointer.load_checkpoint()["model"]
    saved = checkpointer.save_checkpoint({"model": new_rows_trained(state, 1)}, epoch=0, step=1)
    assert [p.name for p in weight_files(saved)] == ["model.safetensors"]
    assert weight_files(saved)[0].stat().st_nlink == 1
    assert not frozen_weights_dir(tmp_path / "run").exists()
