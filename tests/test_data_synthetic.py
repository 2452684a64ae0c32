"""The synthetic corpus: schema, frame-exact alignments, learnable word -> phone mapping, safe writes, CLI."""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import pytest

from ssi.data.sources import ColumnNames, SourceSpec, load_source, validate_dataset
from ssi.data.synthetic import SyntheticSpec, main, make_synthetic_dataset, synthetic_split, word_phones


def test_corpus_has_schema_splits_and_passes_strict_validation(synthetic_corpus_dir: Path) -> None:
    assert sorted(p.name for p in synthetic_corpus_dir.iterdir()) == [
        "synthetic.json", "test.parquet", "train.parquet", "validation.parquet"
    ]  # fmt: skip
    for split, n in (("train", 64), ("validation", 16), ("test", 16)):
        ds = load_source(SourceSpec(str(synthetic_corpus_dir), split=split), ColumnNames())
        checked, report = validate_dataset(ds, ColumnNames(), n_dsus=300, fps=50.0, tolerance_frames=0)
        assert len(checked) == n and not report.skipped
        assert all(4 <= len(w) <= 12 for w in ds["tokenized"])
        assert max(max(s) for s in ds["speech_tokens"]) < 300


def test_alignments_sit_on_frame_boundaries_and_cover_the_word_phones() -> None:
    spec = SyntheticSpec(n_train=20, n_units=64, noise=0.0)
    for row in synthetic_split(spec, "train", progress=False):
        speech = np.array(row["speech_tokens"])
        for word, start, end in zip(
            row["tokenized"], row["aligned_token_start_time"], row["aligned_token_end_time"], strict=True
        ):
            lo, hi = start * spec.fps, end * spec.fps
            assert abs(lo - round(lo)) < 1e-6 and abs(hi - round(hi)) < 1e-6
            frames = speech[round(lo) : round(hi)]
            collapsed = frames[np.r_[True, frames[1:] != frames[:-1]]]
            phones = word_phones(word, spec.n_units)
            # Without noise a word is exactly its phones, each held 2-5 frames (adjacent equal phones merge).
            merged = phones[np.r_[True, phones[1:] != phones[:-1]]]
            assert collapsed.tolist() == merged.tolist() and 2 * len(phones) <= len(frames) <= 5 * len(phones)


def test_noise_rate_and_determinism() -> None:
    spec = SyntheticSpec(n_train=300, noise=0.03)
    noisy = synthetic_split(spec, "train", progress=False)
    assert noisy["speech_tokens"] == synthetic_split(spec, "train", progress=False)["speech_tokens"]
    foreign = total = 0
    for row in noisy:
        speech = np.array(row["speech_tokens"])
        for word, start, end in zip(
            row["tokenized"], row["aligned_token_start_time"], row["aligned_token_end_time"], strict=True
        ):
            frames = speech[round(start * spec.fps) : round(end * spec.fps)]
            foreign += int(np.isin(frames, word_phones(word, spec.n_units), invert=True).sum())
            total += frames.size
    # A replaced frame stays a phone of its word with probability <= 6/300, so this is ~noise.
    assert 0.02 < foreign / total < 0.04


def test_refuses_to_overwrite(tmp_path: Path) -> None:
    spec = SyntheticSpec(n_train=4, n_validation=2, n_test=2)
    out = make_synthetic_dataset(tmp_path / "c", spec, progress=False)
    with pytest.raises(FileExistsError, match="already exists"):
        make_synthetic_dataset(out, spec, progress=False)
    make_synthetic_dataset(out, SyntheticSpec(n_train=6, n_validation=2, n_test=2), overwrite=True, progress=False)
    assert len(datasets.Dataset.from_parquet(str(out / "train.parquet"))) == 6


def test_spec_checks() -> None:
    with pytest.raises(ValueError, match="n_units must be >= 8"):
        SyntheticSpec(n_units=4)
    with pytest.raises(ValueError, match="min_words <= max_words"):
        SyntheticSpec(min_words=5, max_words=3)


def test_cli_writes_a_mimi_rate_corpus(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--output_dir", str(tmp_path / "m"), "--n_train", "5", "--n_validation", "2", "--n_test", "2"]
    argv += ["--sampling_rate", "24000", "--downsampling_ratio", "1920", "--n_units", "100"]
    assert main(argv) == 0
    assert "5/2/2 utterances, 100 units at 12.5 Hz" in capsys.readouterr().out
    ds = datasets.Dataset.from_parquet(str(tmp_path / "m" / "train.parquet"))
    validate_dataset(ds, ColumnNames(), n_dsus=100, fps=12.5, tolerance_frames=0)
    assert main(argv) == 2  # refuses to overwrite; the error is logged
    assert main([*argv, "--overwrite", "--n_units", "4"]) == 2
