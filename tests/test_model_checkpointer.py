"""The HF-directory checkpointer, checked against transformers on real files: save, load, atomicity, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import ssi.model.checkpointer as ckpt_mod
from ssi.files import read_json, write_json
from ssi.hf_dir import SAFETENSORS_INDEX, read_safetensors_header
from ssi.model.architecture import CheckpointError
from ssi.model.builder import build_model
from ssi.model.checkpointer import SpeechCheckpointer
from ssi.model.tensor_files import save_tensors
from ssi.run_dir import list_checkpoints, load_training_state, prune_checkpoints, resolve_checkpoint
from ssi.vocab.extend import extend_model_dir
from ssi.vocab.layout import MANIFEST_NAME

SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "original/tokenizer.model",
    "original/params.json",
    MANIFEST_NAME,
)


@pytest.fixture(scope="module")
def untied_extended_dir(untied_base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bf16, untied output head, sharded (7 tensors per file), 300 DSUs."""
    return extend_model_dir(untied_base_dir, tmp_path_factory.mktemp("untied-ext") / "ext", 300, progress=False)


def input_ids(vocab_size: int, seq_len: int = 48, seed: int = 0) -> torch.Tensor:
    """Ids spread over the whole vocabulary, DSU and modality rows included."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (2, seq_len), generator=gen)
    ids[:, -2:] = torch.tensor([vocab_size - 1, vocab_size - 2])
    return ids


def loaded_model(model_dir: Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    with torch.device("cpu"):
        model = build_model(model_dir).to(dtype)
    model.load_state_dict(SpeechCheckpointer(model_dir, progress=False).load_checkpoint()["model"])
    return model.eval()


def hf_logits(model_dir: Path, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    with torch.no_grad():
        return model(ids).logits


def tune_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)


def perturbed(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Change every weight, as training would, so a saved checkpoint cannot pass by echoing its source."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen).to(p.dtype) * 0.01)
    return model


def safetensors_of_file(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(path, framework="pt") as f:
        # cloned: the tensors may be mapped from the file, which some tests then rewrite
        return {k: f.get_tensor(k).clone() for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)


def safetensors_of(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        tensors |= safetensors_of_file(path)
    return tensors


def copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_json(path: Path, **changes: object) -> None:
    data = read_json(path)
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    write_json(path, data)


# --- save / load ------------------------------------------------------------------------------------


def test_saved_checkpoint_loads_in_transformers_with_identical_logits(tiny_extended_dir: Path, tmp_path: Path) -> None:
    model = perturbed(loaded_model(tiny_extended_dir))
    checkpointer = SpeechCheckpointer(tiny_extended_dir, tmp_path / "run", progress=False)
    saved = checkpointer.save_checkpoint({"model": model.state_dict()}, epoch=0, step=5)
    assert saved == tmp_path / "run" / "checkpoints" / "epoch_0" / "global_step_5"
    ids = input_ids(checkpointer.vocab.vocab_size)
    torch.testing.assert_close(hf_logits(saved, ids), tune_logits(model, ids), atol=1e-5, rtol=0)
    # and the torchtune side reads back exactly what was in memory
    reloaded = SpeechCheckpointer(saved, progress=False).load_checkpoint()["model"]
    expected = model.state_dict()
    assert reloaded.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(reloaded[name], tensor), name


def test_round_trip_is_bit_identical_and_preserves_files(tiny_extended_dir: Path, tmp_path: Path) -> None:
    checkpointer = SpeechCheckpointer(tiny_extended_dir, tmp_path / "run", progress=False)
    state = checkpointer.load_checkpoint()
    saved = checkpointer.save_checkpoint(state, epoch=0, step=1)
    source, written = safetensors_of(tiny_extended_dir), safetensors_of(saved)
    assert written.keys() == source.keys()
    assert "lm_head.weight" not in written  # tied: like the hub's files
    for name in source:
        assert written[name].dtype == source[name].dtype and torch.equal(written[name], source[name]), name
    for rel in SIDE_FILES:
        assert (saved / rel).read_bytes() == (tiny_extended_dir / rel).read_bytes(), rel
    assert not (saved / "training_state").exists()  # nothing but the model was given


def test_bf16_untied_sharded_checkpoint(untied_extended_dir: Path, tmp_path: Path) -> None:
    checkpointer = SpeechCheckpointer(untied_extended_dir, tmp_path / "run", max_shard_size="200KB", progress=False)
    assert checkpointer.save_dtype == torch.bfloat16
    state = checkpointer.load_checkpoint()
    assert {t.dtype for t in state["model"].values()} == {torch.bfloat16}
    assert "output.weight" in state["model"]
    saved = checkpointer.save_checkpoint(state, epoch=1, step=10)

    index = read_json(saved / SAFETENSORS_INDEX)
    shards = sorted(saved.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == {p.name for p in shards}
    for shard in shards:  # under the limit, unless one tensor alone exceeds it (the embedding: 327 kB)
        entries, _ = read_safetensors_header(shard)
        assert len(entries) == 1 or sum(e.nbytes for e in entries) <= 200_000, shard.name
    written = safetensors_of(saved)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in written.values())
    assert set(index["weight_map"]) == set(written) and "lm_head.weight" in written
    source = safetensors_of(untied_extended_dir)
    for name in source:
        assert written[name].dtype == torch.bfloat16 and torch.equal(written[name], source[name]), name
    assert read_json(saved / "config.json")["torch_dtype"] == "bfloat16"
    ids = input_ids(checkpointer.vocab.vocab_size)
    assert torch.equal(hf_logits(saved, ids, torch.bfloat16), hf_logits(untied_extended_dir, ids, torch.bfloat16))


def test_save_dtype_is_selectable(tiny_extended_dir: Path, tmp_path: Path) -> None:
    checkpointer = SpeechCheckpointer(tiny_extended_dir, tmp_path / "run", dtype="bf16", progress=False)
    model = loaded_model(tiny_extended_dir)
    saved = checkpointer.save_checkpoint({"model": model.state_dict()}, epoch=0, step=1)
    config = read_json(saved / "config.json")
    assert config["torch_dtype"] == "bfloat16"
    assert {k: v for k, v in config.items() if k != "torch_dtype"} == {
        k: v for k, v in read_json(tiny_extended_dir / "config.json").items() if k != "torch_dtype"
    }
    source = safetensors_of(tiny_extended_dir)
    for name, tensor in safetensors_of(saved).items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, source[name].to(torch.bfloat16)), name
    # and back: a bf16 checkpoint trains in fp32 and can be saved as fp32 again
    back = SpeechCheckpointer(saved, tmp_path / "run2", dtype=torch.float32, progress=False)
    again = back.save_checkpoint(back.load_checkpoint(), epoch=0, step=2)
    assert read_json(again / "config.json")["torch_dtype"] == "float32"
    assert {t.dtype for t in safetensors_of(again).values()} == {torch.float32}


def test_training_state_round_trip(tiny_extended_dir: Path, tmp_path: Path) -> None:
    model = loaded_model(tiny_extended_dir).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    model(input_ids(2558, seq_len=8)).float().mean().backward()
    optimizer.step()
    scheduler.step()
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": scheduler.state_dict(),
        "rng": torch.get_rng_state(),
        "global_step": 1,
        "consumed_samples": 2,
    }
    written_by_hook = []

    def hook(state_dir: Path) -> None:
        (state_dir / "dataloader_rank0.json").write_text(json.dumps({"position": 17}))
        written_by_hook.append(state_dir)

    checkpointer = SpeechCheckpointer(tiny_extended_dir, tmp_path / "run", progress=False)
    saved = checkpointer.save_checkpoint(state, epoch=0, step=1, training_state_writer=hook)
    assert "model" in state and "optimizer" in state  # the caller's dict is untouched
    assert written_by_hook and written_by_hook[0] != saved / "training_state"  # the hook ran inside the atomic write
    assert json.loads((saved / "training_state" / "dataloader_rank0.json").read_text()) == {"position": 17}

    restored = load_training_state(saved)
    assert set(restored) == {"optimizer", "lr_scheduler", "rng", "global_step", "consumed_samples"}
    assert torch.equal(restored["rng"], state["rng"]) and restored["global_step"] == 1
    fresh = torch.optim.AdamW(loaded_model(saved).parameters(), lr=1e-3)
    fresh.load_state_dict(restored["optimizer"])
    for key, value in optimizer.state_dict()["state"][0].items():
        assert torch.equal(fresh.state_dict()["state"][0][key], value), key
    assert restored["lr_scheduler"] == scheduler.state_dict()

    # torchtune's flag: load_checkpoint returns weights and training state together
    resumed = SpeechCheckpointer(saved, tmp_path / "run", should_load_recipe_state=True, progress=False)
    both = resumed.load_checkpoint()
    assert both["global_step"] == 1 and "optimizer" in both and "model" in both


def test_resumed_run_saves_clean_checkpoints_even_after_its_source_is_pruned(
    tiny_extended_dir: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    first = SpeechCheckpointer(tiny_extended_dir, run, progress=False)
    state = first.load_checkpoint()
    start = first.save_checkpoint({**state, "global_step": 1}, epoch=0, step=1)
    resumed = SpeechCheckpointer(resolve_checkpoint(run, "latest"), run, progress=False)
    state = resumed.load_checkpoint()
    second = resumed.save_checkpoint(state, epoch=0, step=2)
    assert not (second / "training_state").exists()  # the source's training state is not carried over
    assert prune_checkpoints(run, keep_last_n=1) == [start]
    third = resumed.save_checkpoint(state, epoch=1, step=3)
    for rel in SIDE_FILES:
        assert (third / rel).read_bytes() == (tiny_extended_dir / rel).read_bytes(), rel


def test_existing_checkpoint_is_never_overwritten(tiny_extended_dir: Path, tmp_path: Path) -> None:
    checkpointer = SpeechCheckpointer(tiny_extended_dir, tmp_path / "run", progress=False)
    state = checkpointer.load_checkpoint()
    saved = checkpointer.save_checkpoint(state, epoch=0, step=4)
    before = {p: p.stat().st_mtime_ns for p in saved.rglob("*")}
    with pytest.raises(CheckpointError, match="global_step_4 already exists"):
        checkpointer.save_checkpoint(state, epoch=0, step=4)
    assert {p: p.stat().st_mtime_ns for p in saved.rglob("*")} == before


# --- atomicity --------------------------------------------------------------------------------------


def visible_entries(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if not p.name.startswith("."))


def test_failure_while_writing_training_state_leaves_nothing(tiny_extended_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    checkpointer = SpeechCheckpointer(tiny_extended_dir, run, progress=False)
    state = checkpointer.load_checkpoint()

    def failing_hook(state_dir: Path) -> None:
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        checkpointer.save_checkpoint(state, epoch=0, step=3, training_state_writer=failing_hook)
    assert not checkpointer.checkpoint_path(0, 3).exists()
    assert not any(p.name.startswith(".") for p in run.rglob("*"))  # temporary directory cleaned up
    assert list_checkpoints(run) == []


def test_failure_between_weight_shards_leaves_nothing(
    untied_extended_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    checkpointer = SpeechCheckpointer(untied_extended_dir, run, max_shard_size="200KB", progress=False)
    state = checkpointer.load_checkpoint()
    real_write = ckpt_mod.write_safetensors
    calls = []

    def write_then_fail(path: Path, *args: object, **kwargs: object) -> int:
        calls.append(path)
        if len(calls) == 2:
            raise RuntimeError("node lost")
        return real_write(path, *args, **kwargs)

    monkeypatch.setattr(ckpt_mod, "write_safetensors", write_then_fail)
    with pytest.raises(RuntimeError, match="node lost"):
        checkpointer.save_checkpoint(state, epoch=0, step=7)
    assert len(calls) == 2 and calls[0].exists() is False  # the first shard was written, then removed
    assert visible_entries(run) == ["checkpoints", "checkpoints/epoch_0"]


# --- clear errors -----------------------------------------------------------------------------------


def test_directory_without_manifest_is_refused(tiny_base_dir: Path) -> None:
    with pytest.raises(CheckpointError, match=r"missing ssi\.json \(not a speech-extended model"):
        SpeechCheckpointer(tiny_base_dir)


def test_manifest_disagreeing_with_config_is_refused(tiny_extended_dir: Path, tmp_path: Path) -> None:
    model_dir = copy_dir(tiny_extended_dir, tmp_path / "model")
    manifest = read_json(model_dir / MANIFEST_NAME)
    manifest["n_dsus"] = 500
    manifest.pop("vocab_size")
    write_json(model_dir / MANIFEST_NAME, manifest)
    with pytest.raises(CheckpointError, match=r"vocab_size 2558 disagrees with .*ssi\.json.*n_dsus 500"):
        SpeechCheckpointer(model_dir)


def test_missing_weights_are_named(tiny_extended_dir: Path, tmp_path: Path) -> None:
    model_dir = copy_dir(tiny_extended_dir, tmp_path / "model")
    tensors = safetensors_of(model_dir)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_tensors(model_dir / "model.safetensors", tensors)
    with pytest.raises(CheckpointError, match=r"missing weights model\.layers\.1\.mlp\.up_proj\.weight"):
        SpeechCheckpointer(model_dir)
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"missing model\.safetensors or model\.safetensors\.index\.json"):
        SpeechCheckpointer(model_dir)


def test_untied_model_without_output_head_is_refused(untied_extended_dir: Path, tmp_path: Path) -> None:
    model_dir = copy_dir(untied_extended_dir, tmp_path / "model")
    index = read_json(model_dir / SAFETENSORS_INDEX)
    shard = model_dir / index["weight_map"]["lm_head.weight"]
    tensors = {k: v for k, v in safetensors_of_file(shard).items() if k != "lm_head.weight"}
    save_tensors(shard, tensors)
    with pytest.raises(CheckpointError, match=r"missing weights lm_head\.weight .*tie_word_embeddings=False"):
        SpeechCheckpointer(model_dir)


def test_wrong_weight_shape_is_named(tiny_extended_dir: Path, tmp_path: Path) -> None:
    model_dir = copy_dir(tiny_extended_dir, tmp_path / "model")
    tensors = safetensors_of(model_dir)
    tensors["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"][:-2]
    save_tensors(model_dir / "model.safetensors", tensors)
    with pytest.raises(CheckpointError, match=r"model\.embed_tokens\.weight has shape \[2556, 64\].*\[2558, 64\]"):
        SpeechCheckpointer(model_dir)


def test_bad_save_requests_are_refused(tiny_extended_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="inside the model directory"):
        SpeechCheckpointer(tiny_extended_dir, tiny_extended_dir / "run")
    with pytest.raises(CheckpointError, match="checkpointer.save_dtype: unsupported dtype 'int8'"):
        SpeechCheckpointer(tiny_extended_dir, tmp_path / "run", dtype="int8")
    with pytest.raises(CheckpointError, match="max_shard_size 'lots'"):
        SpeechCheckpointer(tiny_extended_dir, tmp_path / "run", max_shard_size="lots")
    checkpointer = SpeechCheckpointer(tiny_extended_dir, tmp_path / "run", progress=False)
    state = checkpointer.load_checkpoint()["model"]
    with pytest.raises(CheckpointError, match="has no 'model' entry"):
        checkpointer.save_checkpoint({"optimizer": {}}, epoch=0, step=1)
    with pytest.raises(CheckpointError, match=r"missing \['norm\.scale'\]"):
        checkpointer.save_checkpoint({"model": {k: v for k, v in state.items() if k != "norm.scale"}}, 0, step=1)
    bad = {**state, "norm.scale": state["norm.scale"][:10]}
    with pytest.raises(CheckpointError, match=r"norm\.scale has shape \[10\], expected \[64\]"):
        checkpointer.save_checkpoint({"model": bad}, epoch=0, step=1)
    with pytest.raises(CheckpointError, match="no output_dir"):
        SpeechCheckpointer(tiny_extended_dir).save_checkpoint({"model": state}, epoch=0, step=1)
    assert not (tmp_path / "run").exists()  # refusals happen before anything is written


# --- configuration ----------------------------------------------------------------------------------


def test_checkpointer_instantiates_from_a_torchtune_config(tiny_extended_dir: Path, tmp_path: Path) -> None:
    """How a recipe builds it: torchtune's config.instantiate on a `checkpointer:` YAML section."""
    from omegaconf import OmegaConf
    from torchtune import config

    section = OmegaConf.create(
        {
            "_component_": "ssi.model.checkpointer.SpeechCheckpointer",
            "checkpoint_dir": str(tiny_extended_dir),
            "output_dir": str(tmp_path / "run"),
            "dtype": "bf16",
            "max_shard_size": "1GB",
        }
    )
    checkpointer = config.instantiate(section, should_load_recipe_state=False, progress=False)
    assert isinstance(checkpointer, SpeechCheckpointer)
    assert (checkpointer.save_dtype, checkpointer.max_shard_size) == (torch.bfloat16, 10**9)
    assert checkpointer.vocab.n_dsus == 300


@pytest.mark.parametrize(
    ("text", "size"), [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 * 2**30), ("1.5 kb", 1500), (4096, 4096)]
)
def test_shard_sizes_parse_like_transformers(text: str | int, size: int) -> None:
    assert ckpt_mod.parse_size(text) == size


def test_transformers5_dtype_key_is_kept(tiny_extended_dir: Path, tmp_path: Path) -> None:
    """A config.json written by transformers 5 names the dtype `dtype`; the saved one keeps that key."""
    model_dir = copy_dir(tiny_extended_dir, tmp_path / "model")
    edit_json(model_dir / "config.json", torch_dtype=None, dtype="float32")
    checkpointer = SpeechCheckpointer(model_dir, tmp_path / "run", dtype="bf16", progress=False)
    saved = checkpointer.save_checkpoint(checkpointer.load_checkpoint(), epoch=0, step=1)
    config = read_json(saved / "config.json")
    assert config["dtype"] == "bfloat16" and "torch_dtype" not in config


def test_tied_checkpoint_storing_lm_head_is_read_like_transformers(tiny_extended_dir: Path, tmp_path: Path) -> None:
    """Some exporters store lm_head.weight even with tied embeddings; transformers ignores the copy."""
    model_dir = copy_dir(tiny_extended_dir, tmp_path / "model")
    tensors = safetensors_of(model_dir)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_tensors(model_dir / "model.safetensors", tensors)
    checkpointer = SpeechCheckpointer(model_dir, tmp_path / "run", progress=False)
    state = checkpointer.load_checkpoint()
    assert "output.weight" not in state["model"]
    saved = checkpointer.save_checkpoint(state, epoch=0, step=1)
    assert "lm_head.weight" not in safetensors_of(saved)
