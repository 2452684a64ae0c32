"""Data presets compose with Hydra as the recipes will (`data=cpt/<preset>`) and build working loaders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from ssi.config import to_container
from ssi.data.config import build_dataset
from ssi.data.loaders import build_dataloader, set_loader_epoch
from ssi.data.sources import DataValidationError
from ssi.vocab.tiktoken import load_tokenizer

CONF = Path(__file__).resolve().parents[1] / "conf"
# The presets of one dataset each; `encoded` (any folder of scripts/encode_audio.py) reads its encoder from the folder.
GENERIC = ["encoded"]
PRESETS = sorted(
    p.stem for p in (CONF / "data" / "cpt").glob("*.yaml") if not p.stem.startswith("_") and p.stem not in GENERIC
)
FRAME_RATES = {
    "mls_hubert_large_l22": (5000, 50.0),
    "mls_speechtokenizer_rvq0": (1024, 50.0),
    "mls_mimi_srvq0": (2048, 12.5),
    "mls_focalcodec_50hz": (8192, 50.0),
    "synthetic": (300, 50.0),
}


def data_config(preset: str, *overrides: str) -> dict:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="inspect_data", overrides=[f"data={preset}", "model=unused", *overrides])
    return to_container(cfg.data)


TEST_SETS = ("librispeech_test_clean", "librispeech_test_other", "voxpopuli_en", "fleurs_en", "common_voice_en")
TEST_SET_ENCODERS = {"hubert_large_l22": "mls_hubert_large_l22", "mimi_srvq0": "mls_mimi_srvq0"}
TEST_SET_PRESETS = sorted(f"{s}_{e}" for s in TEST_SETS for e in TEST_SET_ENCODERS)


LS_960 = "train.clean.100+train.clean.360+train.other.500"
AUDIO_PRESETS = {  # the features method's presets (data.input=audio): source, config, train split, test split
    "audio_folder": ("???", None, "train", "test"),
    "audio_librispeech_960h": ("openslr/librispeech_asr", "all", LS_960, "test.clean"),
    "audio_librispeech_train_clean_100": ("openslr/librispeech_asr", "all", "train.clean.100", "test.clean"),
    "audio_librispeech_train_clean_360": ("openslr/librispeech_asr", "all", "train.clean.360", "test.clean"),
    "audio_librispeech_train_other_500": ("openslr/librispeech_asr", "all", "train.other.500", "test.clean"),
    "audio_librispeech_test_other": ("openslr/librispeech_asr", "all", LS_960, "test.other"),
    "audio_mls_en": ("parler-tts/mls_eng", None, "train", "test"),
    "audio_voxpopuli_en_test": ("openslr/librispeech_asr", "en", LS_960, "test"),
    "audio_fleurs_en_test": ("openslr/librispeech_asr", "en_us", LS_960, "test"),
    "audio_common_voice_en_test": ("openslr/librispeech_asr", "en", LS_960, "test"),
}  # fmt: skip


def test_every_preset_exists_for_cpt_and_sft() -> None:
    assert set(PRESETS) == set(FRAME_RATES)
    sft = sorted(p.stem for p in (CONF / "data" / "sft").glob("*.yaml"))
    paired = ["paired_folder"]  # one corpus as units and as audio (test_features_method.py)
    assert sft == sorted(PRESETS + TEST_SET_PRESETS + GENERIC + list(AUDIO_PRESETS) + paired)  # SFT alone: ASR
    cpt = sorted(p.stem for p in (CONF / "data" / "cpt").glob("*.yaml") if not p.stem.startswith("_"))
    assert cpt == sorted(PRESETS + GENERIC)


@pytest.mark.parametrize("kind", ["cpt", "sft"])
def test_the_encoded_preset_takes_its_encoder_from_the_folder(kind: str) -> None:
    data = data_config(f"{kind}/encoded", "data.train.dataset.source=data/encoded/x")
    assert data["kind"] == kind and data["encoder"] is None and data["dev"]["from_train"] is None
    assert data["dev"]["dataset"]["source"] == "data/encoded/x"


@pytest.mark.parametrize("test_set", TEST_SETS)
@pytest.mark.parametrize("encoder", sorted(TEST_SET_ENCODERS))
def test_test_set_presets_read_the_encoded_folder_and_train_on_mls(test_set: str, encoder: str) -> None:
    preset = f"{test_set}_{encoder}"
    data = data_config(f"sft/{preset}")
    mls = data_config(f"sft/{TEST_SET_ENCODERS[encoder]}")
    assert data["test"]["dataset"] == {**mls["test"]["dataset"], "source": f"data/encoded/{preset}", "split": "test"}
    assert {k: v for k, v in data.items() if k != "test"} == {k: v for k, v in mls.items() if k != "test"}
    text = (CONF / "data" / "sft" / f"{preset}.yaml").read_text()
    assert f"output_dir=data/encoded/{preset}" in text and "scripts/encode_audio.py encoder=" in text


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("kind", ["cpt", "sft"])
def test_preset_composes_with_documented_keys(preset: str, kind: str) -> None:
    data = data_config(f"{kind}/{preset}")
    assert data["kind"] == kind
    encoder = data["encoder"]
    assert (encoder["n_units"], encoder["sampling_rate"] / encoder["downsampling_ratio"]) == FRAME_RATES[preset]
    for split in ("train", "dev", "test"):
        assert data[split]["dataset"]["source"] == data["train"]["dataset"]["source"]
        assert {"source", "split", "n_samples", "shuffle_seed"} <= set(data[split]["dataset"])
        assert "batch_size" in data[split]["dataloader"]
    assert {"type", "mixture", "span", "dedup", "modality_tokens", "max_seq_len"} <= set(data["sequence"])
    assert {"system_prompt", "train_on_input"} <= set(data["sft"])


@pytest.mark.parametrize("preset", sorted(AUDIO_PRESETS))
def test_audio_presets_compose_for_the_features_method(preset: str) -> None:
    data = data_config(f"sft/{preset}", *(["data.train.dataset.source=corpus"] if preset == "audio_folder" else []))
    source, config, train_split, test_split = AUDIO_PRESETS[preset]
    assert data["kind"] == "sft" and data["input"] == "audio" and data["sequence"]["modality_tokens"] is False
    assert data["train"]["dataset"]["split"] == train_split and data["test"]["dataset"]["split"] == test_split
    assert data["test"]["dataset"]["config"] == config
    assert data["train"]["dataloader"]["batch_seconds"] > 0 and data["columns"]["audio"] == "audio"
    if source != "???":
        assert data["train"]["dataset"]["source"] == source
    if preset.endswith("_test") and preset != "audio_librispeech_test_other":  # another corpus: its own columns
        assert data["test"]["dataset"]["source"] != source and set(data["test"]["columns"]) == {"transcript", "id"}


def test_every_key_of_the_common_preset_is_commented() -> None:
    lines = (CONF / "data" / "_common.yaml").read_text().splitlines()
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or stripped.endswith(":"):
            continue
        context = "\n".join(lines[max(0, i - 12) : i + 1])
        assert "#" in context, f"undocumented key near line {i + 1}: {line!r}"


def test_overrides_reach_dev_and_test_sources() -> None:
    data = data_config("cpt/synthetic", "data.train.dataset.source=/elsewhere")
    assert data["dev"]["dataset"]["source"] == data["test"]["dataset"]["source"] == "/elsewhere"


def test_synthetic_presets_build_padded_and_packed_loaders(tiny_extended_dir: Path, synthetic_corpus_dir: Path) -> None:
    tok = load_tokenizer(tiny_extended_dir)
    src = f"data.train.dataset.source={synthetic_corpus_dir}"
    cpt = data_config("cpt/synthetic", src, "data.sequence.max_seq_len=256")
    built = build_dataset(cpt, "train", tok)
    assert len(built.dataset) == 64 and built.report.n_kept == 64 and built.encoder.fps == 50.0
    loader = build_dataloader(cpt, "train", built, tok)
    set_loader_epoch(loader, 1)
    batch = next(iter(loader))
    assert batch["tokens"].shape[0] == 8 and batch["labels"].shape == batch["tokens"].shape
    assert int(batch["token_counts"]["dsu"]) > 0 and int(batch["token_counts"]["text"]) > 0
    assert built.dataset.epoch == 1

    packing = ["data.packing.enabled=true", "data.sequence.max_seq_len=256", "data.train.dataloader.batch_size=4"]
    packed_cfg = data_config("cpt/synthetic", src, *packing)
    packed = build_dataloader(packed_cfg, "train", build_dataset(packed_cfg, "train", tok), tok, rank=1, world_size=2)
    set_loader_epoch(packed, 0)
    batch = next(iter(packed))
    assert batch["tokens"].shape == (4, 256) and "mask" not in batch  # built on the training device, not in workers
    assert [int(lens.sum()) for lens in batch["seq_lens"]] == [256] * 4

    sft = data_config("sft/synthetic", src)
    dev = build_dataset(sft, "dev", tok, inference=True)
    example = dev.dataset[0]
    assert example["id"].startswith("synth_validation_") and example["tokens"][-1] == 10  # "\n\n" ends the header
    with pytest.raises(DataValidationError, match="inference prompts are built from SFT presets"):
        build_dataset(cpt, "dev", tok, inference=True)


def test_preset_encoder_must_fit_the_model(tiny_extended_dir: Path, synthetic_corpus_dir: Path) -> None:
    tok = load_tokenizer(tiny_extended_dir)
    cfg = data_config("cpt/mls_hubert_large_l22", f"data.train.dataset.source={synthetic_corpus_dir}")
    with pytest.raises(DataValidationError, match="5000 units but the model manifest has n_dsus=300"):
        build_dataset(cfg, "train", tok)


def test_interleaved_cpt_refuses_data_without_word_alignments(tiny_extended_dir: Path, tmp_path: Path) -> None:
    tok = load_tokenizer(tiny_extended_dir)
    rows = [{"ID": f"u{i}", "transcript": "the cat sat", "speech_tokens": [i % 9] * 40} for i in range(8)]
    path = tmp_path / "asr.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    src = f"data.train.dataset.source={path}"
    for overrides in ([], ["+data.sequence.mixture={interleaved: 0.5, dsu_only: 0.5}", "data.sequence.type=mixture"]):
        with pytest.raises(DataValidationError, match=r"has no word alignments .* which interleaved CPT needs"):
            build_dataset(data_config("cpt/synthetic", src, *overrides), "train", tok)
    concatenated = data_config("cpt/synthetic", src, "data.sequence.type=concatenated_txt_dsu")
    assert len(build_dataset(concatenated, "train", tok).dataset) == 8
    no_interleaved = ["data.sequence.type=mixture", "+data.sequence.mixture={interleaved: 0, dsu_only: 1}"]
    assert build_dataset(data_config("cpt/synthetic", src, *no_interleaved), "train", tok).dataset[0]["tokens"]
    sft = build_dataset(data_config("sft/synthetic", src), "train", tok)
    assert len(sft.dataset) == 8 and sft.report.n_words == 24
