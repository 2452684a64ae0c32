"""scripts/extend_llama3_2.py: outputs readable by transformers, base model untouched, refusals clean."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from ssi.hf_dir import read_rows_f32, read_safetensors_header
from ssi.vocab.extend import ExtensionError, extend_model_dir, main
from ssi.vocab.layout import MAX_DSUS, SpeechVocab
from ssi.vocab.new_rows import MIN_SAMPLE_ROWS, sample_rows

from .conftest import N_TEST_DSUS

REPO = Path(__file__).resolve().parents[1]


def load_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    weights = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        weights.update(load_file(path))
    return weights


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_transformers_reads_extended_model_with_unchanged_base_logits(tiny_base_dir, tiny_extended_dir) -> None:
    base = AutoModelForCausalLM.from_pretrained(tiny_base_dir, dtype=torch.float32).eval()
    extended = AutoModelForCausalLM.from_pretrained(tiny_extended_dir, dtype=torch.float32).eval()
    vocab = SpeechVocab.load(tiny_extended_dir)
    assert extended.config.vocab_size == vocab.vocab_size == 2000 + 256 + N_TEST_DSUS + 2
    input_ids = torch.randint(0, vocab.base_vocab_size, (3, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base_logits = base(input_ids).logits
        ext_logits = extended(input_ids).logits
    torch.testing.assert_close(ext_logits[..., : vocab.base_vocab_size], base_logits, atol=1e-5, rtol=0)


def test_base_rows_are_bit_identical_and_new_rows_fitted(tiny_base_dir, tiny_extended_dir) -> None:
    base, ext = load_weights(tiny_base_dir), load_weights(tiny_extended_dir)
    assert set(base) == set(ext) and "lm_head.weight" not in ext  # tied: one matrix, as on the hub
    for name, tensor in base.items():
        if name != "model.embed_tokens.weight":
            assert torch.equal(ext[name], tensor), name
    emb_base, emb_ext = base["model.embed_tokens.weight"], ext["model.embed_tokens.weight"]
    assert emb_ext.dtype == emb_base.dtype == torch.float32
    assert torch.equal(emb_ext[: emb_base.shape[0]], emb_base)
    new = emb_ext[emb_base.shape[0] :]
    assert new.shape == (N_TEST_DSUS + 2, emb_base.shape[1])
    # multivariate normal fitted on the BPE rows: distinct rows with the base statistics
    bpe = emb_base[:2000]
    assert len(torch.unique(new, dim=0)) == len(new)
    assert (new.mean(0) - bpe.mean(0)).abs().max() < 4 * bpe.std(0).max() / len(new) ** 0.5
    assert torch.allclose(new.std(0).mean(), bpe.std(0).mean(), rtol=0.15)


def test_new_rows_follow_the_base_covariance_from_a_sample(tmp_path) -> None:
    """A base larger than the sample (every k-th row is read): the drawn rows still have the base's mean and
    anisotropic, correlated covariance."""
    rng = np.random.default_rng(0)
    n_rows, hidden = 40_000, 48
    mixing = rng.standard_normal((hidden, hidden)) * np.linspace(0.2, 2.0, hidden)
    base = (rng.standard_normal((n_rows, hidden)) @ mixing + 0.5).astype(np.float32)
    path = tmp_path / "m.safetensors"
    save_file({"embed": torch.from_numpy(base).to(torch.bfloat16)}, str(path))
    (entry,) = read_safetensors_header(path)[0]
    truth = read_rows_f32(path, entry, 0, n_rows)
    new = sample_rows(path, entry, n_rows, 30_000, np.random.default_rng(1))
    assert n_rows // 4 > MIN_SAMPLE_ROWS  # the sample is a strict subset of the rows
    scale = np.sqrt(np.diag(np.cov(truth.T)))
    assert np.abs(new.mean(0) - truth.mean(0)).max() < 0.1 * scale.max()
    relative = np.linalg.norm(np.cov(new.T) - np.cov(truth.T)) / np.linalg.norm(np.cov(truth.T))
    assert relative < 0.15, relative


def test_output_directory_is_complete(tiny_base_dir, tiny_extended_dir) -> None:
    expected = {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "original",
        "original/tokenizer.model",
        "original/params.json",
        "ssi.json",
    }
    assert set(listing(tiny_extended_dir)) == expected
    config = json.loads((tiny_extended_dir / "config.json").read_text())
    base_config = json.loads((tiny_base_dir / "config.json").read_text())
    assert config == {**base_config, "vocab_size": 2558}
    generation = json.loads((tiny_extended_dir / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (2000, 2001)
    assert json.loads((tiny_extended_dir / "original/params.json").read_text())["vocab_size"] == 2558
    assert (tiny_extended_dir / "original/tokenizer.model").read_bytes() == (
        tiny_base_dir / "original/tokenizer.model"
    ).read_bytes()
    manifest = json.loads((tiny_extended_dir / "ssi.json").read_text())
    assert manifest["n_dsus"] == N_TEST_DSUS and manifest["n_bpe"] == 2000
    assert manifest["base_model"] == tiny_base_dir.name
    assert manifest["extension"] == {"init": "multivariate_normal", "seed": 42, "n_new_rows": N_TEST_DSUS + 2}


def test_untied_bf16_sharded_model(untied_base_dir, tmp_path) -> None:
    out = extend_model_dir(untied_base_dir, tmp_path / "out", 40, modality_tokens=False, progress=False)
    base, ext = load_weights(untied_base_dir), load_weights(out)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert ext[name].dtype == torch.bfloat16
        assert ext[name].shape[0] == 2256 + 40
        assert torch.equal(ext[name][:2256], base[name])
    assert not torch.equal(ext["model.embed_tokens.weight"][2256:], ext["lm_head.weight"][2256:])
    index = json.loads((out / "model.safetensors.index.json").read_text())
    base_index = json.loads((untied_base_dir / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == base_index["weight_map"]
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in ext.values())
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16 and model.get_output_embeddings().weight.shape[0] == 2296
    assert SpeechVocab.load(out).modality_tokens is False


def test_mean_init_and_seed(tiny_base_dir, tmp_path) -> None:
    mean_dir = extend_model_dir(tiny_base_dir, tmp_path / "mean", 5, init="mean", progress=False)
    emb = load_weights(mean_dir)["model.embed_tokens.weight"]
    expected = emb[:2000].double().mean(0).float()
    assert torch.allclose(emb[2256:], expected.expand(7, -1), atol=1e-7)
    a = extend_model_dir(tiny_base_dir, tmp_path / "a", 5, seed=1, progress=False)
    b = extend_model_dir(tiny_base_dir, tmp_path / "b", 5, seed=1, progress=False)
    c = extend_model_dir(tiny_base_dir, tmp_path / "c", 5, seed=2, progress=False)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_side_files_are_copied_and_meta_weights_skipped(tiny_base_dir, tmp_path) -> None:
    src = tmp_path / "src"
    shutil.copytree(tiny_base_dir, src)
    (src / "LICENSE.txt").write_text("licence")
    (src / "original" / "consolidated.00.pth").write_bytes(b"meta weights")
    (src / ".cache").mkdir()
    (src / ".cache" / "junk").write_text("x")
    out = extend_model_dir(src, tmp_path / "out", 3, progress=False)
    assert (out / "LICENSE.txt").read_text() == "licence"
    assert not (out / "original" / "consolidated.00.pth").exists() and not (out / ".cache").exists()


def test_cli_default_output_name_and_overwrite(tiny_base_dir, tmp_path) -> None:
    cmd = [sys.executable, str(REPO / "scripts/extend_llama3_2.py"), "--n_new_dsus", "12", "--no-progress"]
    run = subprocess.run([*cmd, "--input_dir", str(tiny_base_dir)], cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    out = tmp_path / f"{tiny_base_dir.name}-12-dsus"
    assert run.stdout.strip() == str(out) and SpeechVocab.load(out).n_dsus == 12
    again = subprocess.run([*cmd, "--input_dir", str(tiny_base_dir)], cwd=tmp_path, capture_output=True, text=True)
    assert again.returncode == 2 and "already exists; pass --overwrite" in again.stderr
    args = ["--input_dir", str(tiny_base_dir), "--overwrite", "--no-modality-tokens", "--seed", "3"]
    forced = subprocess.run([*cmd, *args], cwd=tmp_path, capture_output=True, text=True)
    assert forced.returncode == 0, forced.stderr
    assert SpeechVocab.load(out).modality_tokens is False
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temporary leftovers


# --- refusals: each names the problem and writes nothing ----------------------------------------


def _broken_copy(tiny_base_dir: Path, tmp_path: Path, breakage: str) -> Path:
    src = tmp_path / "input"
    shutil.copytree(tiny_base_dir, src)
    if breakage == "no_config":
        (src / "config.json").unlink()
    elif breakage == "not_llama":
        config = json.loads((src / "config.json").read_text())
        (src / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    elif breakage == "no_tiktoken":
        (src / "original/tokenizer.model").unlink()
    elif breakage == "no_tokenizer_json":
        (src / "tokenizer.json").unlink()
    elif breakage == "no_weights":
        (src / "model.safetensors").unlink()
    elif breakage == "missing_shard":
        (src / "model.safetensors").unlink()
        (src / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}})
        )
    elif breakage == "vocab_mismatch":
        config = json.loads((src / "config.json").read_text())
        (src / "config.json").write_text(json.dumps({**config, "vocab_size": 2300}))
    elif breakage == "decoder_disagrees":  # tokenizer_config.json moves <|eot_id|> onto the next id
        config = json.loads((src / "tokenizer_config.json").read_text())
        decoder = config["added_tokens_decoder"]
        decoder["2009"], decoder["2010"] = decoder["2010"], decoder["2009"]
        (src / "tokenizer_config.json").write_text(json.dumps(config))
    elif breakage == "special_gap":  # the last special token sits past the block
        tokenizer = json.loads((src / "tokenizer.json").read_text())
        tokenizer["added_tokens"][-1]["id"] = 2300
        (src / "tokenizer.json").write_text(json.dumps(tokenizer))
        config = json.loads((src / "tokenizer_config.json").read_text())
        config["added_tokens_decoder"]["2300"] = config["added_tokens_decoder"].pop("2255")
        (src / "tokenizer_config.json").write_text(json.dumps(config))
    return src


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        ("no_config", "is not an HF model directory: config.json is missing"),
        ("not_llama", "model_type is 'gpt2', expected 'llama'"),
        ("no_tiktoken", "missing required files: original/tokenizer.model"),
        ("no_tokenizer_json", "missing required files: tokenizer.json"),
        ("no_weights", "has no weights: neither model.safetensors nor model.safetensors.index.json"),
        ("missing_shard", r"names shards that are missing: \['model-00001-of-00002.safetensors'\]"),
        (
            "vocab_mismatch",
            r"vocab_size is 2300, but the base vocabulary \(2000 ranks .* \+ 256 special tokens\) has 2256",
        ),
        ("decoder_disagrees", r"<\|eot_id\|> has id 2009 in tokenizer.json but id 2010 in .*tokenizer_config.json"),
        ("special_gap", r"special token <\|reserved_special_token_247\|> has id 2300, expected 2255"),
    ],
)
def test_refuses_bad_input_without_writing(tiny_base_dir, tmp_path, breakage: str, message: str) -> None:
    src = _broken_copy(tiny_base_dir, tmp_path, breakage)
    before = listing(tmp_path)
    with pytest.raises(ExtensionError, match=message):
        extend_model_dir(src, tmp_path / "out", 10, progress=False)
    assert listing(tmp_path) == before


@pytest.mark.parametrize("n", [0, -3, MAX_DSUS + 1])
def test_refuses_impossible_unit_counts(tiny_base_dir, tmp_path, n: int) -> None:
    with pytest.raises(ExtensionError, match=f"--n_new_dsus must be between 1 and {MAX_DSUS}.*got {n}"):
        extend_model_dir(tiny_base_dir, tmp_path / "out", n, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_refuses_already_extended_input(tiny_extended_dir, tiny_base_dir, tmp_path) -> None:
    with pytest.raises(ExtensionError, match="is already extended"):
        extend_model_dir(tiny_extended_dir, tmp_path / "out", 10, progress=False)
    # a copy whose manifest was lost is still recognised from its vocabulary
    stripped = tmp_path / "stripped"
    shutil.copytree(tiny_extended_dir, stripped)
    (stripped / "ssi.json").unlink()
    with pytest.raises(ExtensionError, match=r"tokenizer.json: already contains DSU or modality tokens"):
        extend_model_dir(stripped, tmp_path / "out", 10, progress=False)
    config = json.loads((stripped / "config.json").read_text())
    (stripped / "config.json").write_text(json.dumps({**config, "vocab_size": 2256}))
    with pytest.raises(ExtensionError, match="already contains DSU or modality tokens"):
        extend_model_dir(stripped, tmp_path / "out", 10, progress=False)
    assert not (tmp_path / "out").exists()


def test_refuses_existing_output_and_output_inside_input(tiny_base_dir, tmp_path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(ExtensionError, match="already exists; pass --overwrite"):
        extend_model_dir(tiny_base_dir, out, 10, progress=False)
    assert listing(out) == ["keep.txt"]
    with pytest.raises(ExtensionError, match="must not be the input directory or inside it"):
        extend_model_dir(tiny_base_dir, tiny_base_dir / "sub", 10, progress=False)
    assert not (tiny_base_dir / "sub").exists()


def test_failure_mid_write_leaves_nothing(tiny_base_dir, tmp_path) -> None:
    src = tmp_path / "input"
    shutil.copytree(tiny_base_dir, src)
    weights = src / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])  # truncated download
    with pytest.raises(Exception, match="ended early: truncated safetensors file"):
        extend_model_dir(src, tmp_path / "out", 10, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["input"]


def test_cli_reports_errors_on_stderr(tmp_path, capsys) -> None:
    assert main(["--n_new_dsus", "5", "--input_dir", str(tmp_path / "nope"), "--output_dir", str(tmp_path / "o")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
