"""Sources (every kind of `source`) and validation (every error names sample id, column and value)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import datasets
import pytest

from ssi.data.sources import (
    ColumnNames,
    DataValidationError,
    Encoder,
    SourceSpec,
    has_alignments,
    load_source,
    source_kind,
    validate_dataset,
)
from ssi.vocab.layout import SpeechVocab

COLS = ColumnNames()


def row(i: int, **overrides) -> dict:
    base = {
        "ID": f"utt{i}",
        "transcript": "the cat",
        "tokenized": ["the", "cat"],
        "aligned_token_start_time": [0.0, 0.3],
        "aligned_token_end_time": [0.3, 0.58],
        "speech_tokens": [i % 7] * 30,
    }
    return {**base, **overrides}


def rows_dataset(rows: list[dict]) -> datasets.Dataset:
    return datasets.Dataset.from_list(rows)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --- sources --------------------------------------------------------------------------------------


def test_glob_of_jsonl_files_merges_in_sorted_order(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "part-1.jsonl", [row(2), row(3)])
    write_jsonl(tmp_path / "part-0.jsonl", [row(0), row(1)])
    ds = load_source(SourceSpec(str(tmp_path / "part-*.jsonl")), COLS)
    assert ds["ID"] == ["utt0", "utt1", "utt2", "utt3"]
    assert ds.column_names == COLS.all()


def test_split_placeholder_and_n_samples_stream_only_the_head(tmp_path: Path) -> None:
    rows_dataset([row(i) for i in range(10)]).to_parquet(str(tmp_path / "dev.parquet"))
    ds = load_source(SourceSpec(str(tmp_path / "{split}.parquet"), split="dev", n_samples=3), COLS)
    assert ds["ID"] == ["utt0", "utt1", "utt2"]


def test_shuffle_seed_picks_a_reproducible_subset(tmp_path: Path) -> None:
    rows_dataset([row(i) for i in range(50)]).save_to_disk(str(tmp_path / "disk"))
    spec = SourceSpec(str(tmp_path / "disk"), n_samples=5, shuffle_seed=3)
    first, second = load_source(spec, COLS)["ID"], load_source(spec, COLS)["ID"]
    assert first == second and first != [f"utt{i}" for i in range(5)] and len(set(first)) == 5


def test_save_to_disk_dataset_dict_selects_split(tmp_path: Path) -> None:
    dd = datasets.DatasetDict({"train": rows_dataset([row(0)]), "validation": rows_dataset([row(1), row(2)])})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert load_source(SourceSpec(str(tmp_path / "dd"), split="validation"), COLS)["ID"] == ["utt1", "utt2"]
    with pytest.raises(DataValidationError, match=r"no split 'test'; available splits: \['train', 'validation'\]"):
        load_source(SourceSpec(str(tmp_path / "dd"), split="test"), COLS)


def test_folder_of_split_named_files(synthetic_corpus_dir: Path) -> None:
    assert source_kind(SourceSpec(str(synthetic_corpus_dir)))[0] == "folder"
    ds = load_source(SourceSpec(str(synthetic_corpus_dir), split="validation"), COLS)
    assert len(ds) == 16 and ds[0]["ID"].startswith("synth_validation_")
    head = load_source(SourceSpec(str(synthetic_corpus_dir), split="test", n_samples=3), COLS)
    assert head["ID"] == ["synth_test_000000", "synth_test_000001", "synth_test_000002"]


def test_source_kinds_and_bad_paths(tmp_path: Path) -> None:
    assert source_kind(SourceSpec("anilkeshwani/mls-hubert_large_ll60k-layer_22")) == (
        "hub",
        ["anilkeshwani/mls-hubert_large_ll60k-layer_22"],
    )
    with pytest.raises(DataValidationError, match="no files match"):
        source_kind(SourceSpec(str(tmp_path / "missing-*.parquet")))
    with pytest.raises(DataValidationError, match="not-there: no such local file or folder"):  # not a hub id
        source_kind(SourceSpec(str(tmp_path / "not-there")))
    (tmp_path / "a.parquet").write_bytes(b"")
    (tmp_path / "b.jsonl").write_text("")
    with pytest.raises(DataValidationError, match=re.escape("only .jsonl/.json or only .parquet")):
        source_kind(SourceSpec(str(tmp_path / "*")))


def test_configured_column_names_are_used_and_missing_ones_listed(tmp_path: Path) -> None:
    renamed = [{("units" if k == "speech_tokens" else k): v for k, v in row(i).items()} for i in range(2)]
    path = write_jsonl(tmp_path / "x.jsonl", renamed)
    with pytest.raises(DataValidationError) as err:
        load_source(SourceSpec(str(path)), COLS)
    assert "missing column(s) ['speech_tokens']" in str(err.value)
    assert "'units'" in str(err.value) and "available columns" in str(err.value)
    cols = ColumnNames(speech="units")
    ds = load_source(SourceSpec(str(path)), cols)
    assert "units" in ds.column_names
    validated, _ = validate_dataset(ds, cols, n_dsus=10, fps=50)
    assert len(validated) == 2


# --- validation -----------------------------------------------------------------------------------


def validate(rows: list[dict], **kwargs):
    return validate_dataset(rows_dataset(rows), COLS, n_dsus=kwargs.pop("n_dsus", 100), fps=50.0, **kwargs)


def test_valid_rows_pass_and_are_counted() -> None:
    ds, report = validate([row(i) for i in range(5)])
    assert len(ds) == 5 and report.n_kept == 5 and report.n_frames == 150 and report.n_words == 10
    assert "5/5 samples kept" in report.summary(50.0)


def test_dsu_out_of_range_names_sample_column_value_and_frame() -> None:
    bad = row(1, speech_tokens=[3, 4, 100, 5] + [1] * 26)
    with pytest.raises(DataValidationError) as err:
        validate([row(0), bad], n_dsus=100)
    msg = str(err.value)
    assert "sample 'utt1' (row 1)" in msg and "'speech_tokens'" in msg
    assert "DSU id 100 at frame 2 is outside [0, 100)" in msg
    with pytest.raises(DataValidationError, match="DSU id -1 at frame 0"):
        validate([row(0, speech_tokens=[-1] * 30)])


def test_word_alignment_length_mismatch() -> None:
    bad = row(3, aligned_token_end_time=[0.3])
    with pytest.raises(DataValidationError) as err:
        validate([bad])
    msg = str(err.value)
    assert "sample 'utt3'" in msg and "'aligned_token_end_time'" in msg
    assert "1 alignment times for 2 words" in msg and "[0.3]" in msg


def test_alignment_beyond_speech_length_at_frame_rate() -> None:
    # 30 frames at 50 Hz = 0.6 s; a word ending at 0.64 s is frame 32 > 30 + 1 tolerance.
    bad = row(4, aligned_token_end_time=[0.3, 0.64])
    with pytest.raises(DataValidationError) as err:
        validate([bad])
    msg = str(err.value)
    assert "sample 'utt4'" in msg and "'aligned_token_end_time'" in msg
    assert "ends at 0.640 s = frame 32.0 at 50 Hz" in msg and "30 frames" in msg
    ok, _ = validate([row(4, aligned_token_end_time=[0.3, 0.62])])  # one frame past: within tolerance
    assert len(ok) == 1
    with pytest.raises(DataValidationError):
        validate([row(4, aligned_token_end_time=[0.3, 0.62])], tolerance_frames=0)


def test_start_after_end_and_negative_times() -> None:
    with pytest.raises(DataValidationError, match=r"sample 'utt5'.*word 1 has start 0.5 and end 0.4"):
        validate([row(5, aligned_token_start_time=[0.0, 0.5], aligned_token_end_time=[0.3, 0.4])])
    with pytest.raises(DataValidationError, match=re.escape("word 0 has start -0.1")):
        validate([row(5, aligned_token_start_time=[-0.1, 0.3])])


def test_empty_speech_and_text_skipped_and_counted() -> None:
    rows = [row(0), row(1, speech_tokens=[]), row(2, transcript="  ", tokenized=[], **_no_times()), row(3)]
    ds, report = validate(rows)
    assert ds["ID"] == ["utt0", "utt3"]
    assert report.skipped == {"empty speech": 1, "empty text": 1}
    assert report.skipped_ids == ["utt1", "utt2"] and report.n_kept == 2


def test_empty_fails_when_configured() -> None:
    with pytest.raises(DataValidationError, match=r"sample 'utt1' \(row 1\), column 'speech_tokens': empty speech"):
        validate([row(0), row(1, speech_tokens=[])], on_empty="fail")
    with pytest.raises(DataValidationError, match=r"sample 'utt2' \(row 0\), column 'transcript': empty text"):
        validate([row(2, transcript="", tokenized=[], **_no_times())], on_empty="fail")


def test_errors_are_found_in_later_batches() -> None:
    rows = [row(i) for i in range(9)] + [row(9, speech_tokens=[500] * 30)]
    with pytest.raises(DataValidationError, match=r"sample 'utt9' \(row 9\)"):
        validate(rows, batch_size=4)


def _no_times() -> dict:
    return {"aligned_token_start_time": [], "aligned_token_end_time": []}


# --- encoder vs manifest --------------------------------------------------------------------------


def test_encoder_frame_rate_and_manifest_checks() -> None:
    assert Encoder("mimi", 2048, 24000, 1920).fps == 12.5
    vocab = SpeechVocab(n_bpe=2000, n_dsus=300, frame_rate=50.0)
    Encoder("synthetic", 300, 16000, 320).check_vocab(vocab)
    with pytest.raises(DataValidationError, match="5000 units but the model manifest has n_dsus=300"):
        Encoder("hubert", 5000, 16000, 320).check_vocab(vocab)
    with pytest.raises(DataValidationError, match=r"runs at 12.5 Hz but the model manifest records frame_rate=50.0"):
        Encoder("mimi", 256, 24000, 1920).check_vocab(vocab)


# --- data without word alignments (ASR test sets) and sharded folders -----------------------------


def _unaligned(i: int, **overrides) -> dict:
    return {k: v for k, v in row(i, **overrides).items() if k not in COLS.alignment()}


def test_sources_without_word_alignments_load_and_validate(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "asr.jsonl", [_unaligned(0), _unaligned(1, transcript="  ", speech_tokens=[1]), _unaligned(2)]
    )
    ds = load_source(SourceSpec(str(path)), COLS)
    assert ds.column_names == COLS.required() and not has_alignments(ds, COLS)
    checked, report = validate_dataset(ds, COLS, n_dsus=100, fps=50.0)
    assert checked["ID"] == ["utt0", "utt2"] and report.skipped == {"empty text": 1} and report.n_words == 4
    with pytest.raises(DataValidationError, match=r"sample 'utt9' \(row 0\), column 'speech_tokens': DSU id 100"):
        validate_dataset(rows_dataset([_unaligned(9, speech_tokens=[100])]), COLS, n_dsus=100, fps=50.0)
    partial = write_jsonl(tmp_path / "partial.jsonl", [{**_unaligned(0), "tokenized": ["the", "cat"]}])
    with pytest.raises(
        DataValidationError, match=r"missing column\(s\) \['aligned_token_start_time', 'aligned_token_end_time'\]"
    ):
        load_source(SourceSpec(str(partial)), COLS)


def test_a_sharded_folder_is_read_only_when_every_shard_is_there(tmp_path: Path) -> None:
    data = tmp_path / "encoded" / "data"
    data.mkdir(parents=True)
    rows_dataset([row(0), row(1)]).to_parquet(str(data / "test-00000-of-00002.parquet"))
    rows_dataset([row(5)]).to_parquet(str(data / "train-00000-of-00001.parquet"))
    with pytest.raises(DataValidationError, match=r"split 'test' has 1 of 2 shards \(missing \[1\]\)"):
        load_source(SourceSpec(str(tmp_path / "encoded"), split="test"), COLS)
    assert load_source(SourceSpec(str(tmp_path / "encoded"), split="train"), COLS)["ID"] == ["utt5"]
    rows_dataset([row(2)]).to_parquet(str(data / "test-00001-of-00002.parquet"))
    assert load_source(SourceSpec(str(tmp_path / "encoded"), split="test"), COLS)["ID"] == ["utt0", "utt1", "utt2"]
    rows_dataset([row(3)]).to_parquet(str(data / "test-00000-of-00003.parquet"))
    with pytest.raises(DataValidationError, match=r"split 'test' has shard files of \[2, 3\] shards"):
        load_source(SourceSpec(str(tmp_path / "encoded"), split="test"), COLS)
