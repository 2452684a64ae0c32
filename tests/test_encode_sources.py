"""Reading audio without torchaudio/torchcodec: formats, rates, channels; every kind of source; ids; sharding."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import soundfile
import soxr
from datasets.table import embed_table_storage

from ssi.encode import EncodeError
from ssi.encode.audio import AudioError, AudioRef, decode_audio
from ssi.encode.fixtures import Clip, mixed_clips, synthetic_wave, write_audiofolder, write_clip
from ssi.encode.sharding import resolve_shard, shard_range
from ssi.encode.sources import AudioColumns, AudioSourceSpec, load_audio_source

COLUMNS = AudioColumns()


@pytest.mark.parametrize(
    ("rate", "channels", "fmt", "slack"),
    [(16000, 1, "wav", 0), (44100, 2, "flac", 1), (24000, 1, "mp3", 0), (8000, 1, "ogg", 0), (22050, 2, "wav", 1)],
)
def test_any_format_rate_and_channel_count_becomes_mono_at_the_encoder_rate(
    tmp_path: Path, rate: int, channels: int, fmt: str, slack: int
) -> None:
    path = write_clip(tmp_path, Clip("x", 1.5, rate, channels, fmt), n_words=3, seed=0)
    wave = decode_audio(AudioRef(str(path)), 16000)
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert abs(len(wave) - 24000) <= slack
    from_bytes = decode_audio(AudioRef("x", path.read_bytes()), 16000)
    np.testing.assert_array_equal(wave, from_bytes)
    if fmt in ("wav", "flac"):  # lossless: the mono mix of the file, resampled with soxr
        raw, _ = soundfile.read(path, dtype="float32", always_2d=True)
        expected = soxr.resample(raw.mean(axis=1, dtype=np.float32), rate, 16000, quality="HQ")
        np.testing.assert_allclose(wave, expected, atol=1e-6)


def test_resampling_keeps_the_signal(tmp_path: Path) -> None:
    t = np.arange(44100 * 2) / 44100
    soundfile.write(
        tmp_path / "tone.wav", (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 44100, subtype="FLOAT"
    )
    wave = decode_audio(AudioRef(str(tmp_path / "tone.wav")), 16000)
    reference = 0.5 * np.sin(2 * np.pi * 440 * np.arange(32000) / 16000)
    assert np.corrcoef(wave[1000:-1000], reference[1000:-1000])[0, 1] > 0.999


def test_unreadable_empty_and_missing_audio_name_the_file(tmp_path: Path) -> None:
    soundfile.write(tmp_path / "empty.wav", np.zeros((0, 1), dtype=np.float32), 16000)
    with pytest.raises(AudioError, match=r"file '.*empty.wav' is empty \(0 samples\)"):
        decode_audio(AudioRef(str(tmp_path / "empty.wav")), 16000)
    with pytest.raises(AudioError, match=r"cannot decode embedded audio 'junk.flac'"):
        decode_audio(AudioRef("junk.flac", b"not audio at all"), 16000)
    with pytest.raises(AudioError, match=r"cannot decode file '.*missing.wav'"):
        decode_audio(AudioRef(str(tmp_path / "missing.wav")), 16000)
    with pytest.raises(AudioError, match="neither bytes nor a path"):
        decode_audio(AudioRef(None), 16000)


# --- sources ------------------------------------------------------------------------------------------


def test_audiofolder_jsonl_with_alignments(tmp_path: Path) -> None:
    folder = write_audiofolder(tmp_path / "af", mixed_clips(6), alignments=True)
    source = load_audio_source(AudioSourceSpec(str(folder), "train"), COLUMNS)
    assert len(source) == 6 and source.has_alignments
    assert source.ids == [f"utt{i:04d}" for i in range(6)]  # the file names without extension
    rows = source.rows(range(1, 3))
    assert [r.index for r in rows] == [1, 2] and rows[0].audio.path == str(folder / "utt0001.flac")
    words, starts, ends = rows[0].alignment
    assert rows[0].text == " ".join(words) and len(starts) == len(ends) == len(words)
    assert [r.id for r in source.rows([4, 0])] == ["utt0004", "utt0000"]


def test_audiofolder_csv_in_a_split_folder_with_an_id_column(tmp_path: Path) -> None:
    folder = write_audiofolder(tmp_path / "af" / "test", mixed_clips(3), metadata="csv", text_column="sentence")
    with (folder / "metadata.csv").open() as f:
        lines = f.read().splitlines()
    lines[0] += ",utt_id"
    lines[1:] = [line + f",spk1-{i}" for i, line in enumerate(lines[1:])]
    (folder / "metadata.csv").write_text("\n".join(lines) + "\n")
    columns = AudioColumns(text="sentence", id="utt_id")
    source = load_audio_source(AudioSourceSpec(str(tmp_path / "af"), "test"), columns)
    assert source.ids == ["spk1-0", "spk1-1", "spk1-2"] and not source.has_alignments
    with pytest.raises(EncodeError, match=r"missing column\(s\) \['transcript'\]; available columns: .*'sentence'"):
        load_audio_source(AudioSourceSpec(str(tmp_path / "af"), "test"), AudioColumns())


def test_save_to_disk_and_data_file_folders_embed_bytes(tmp_path: Path) -> None:
    folder = write_audiofolder(tmp_path / "af", mixed_clips(4))
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    ds = datasets.Dataset.from_dict(
        {"audio": [str(folder / r["file_name"]) for r in rows], "text": [r["transcript"] for r in rows]}
    ).cast_column("audio", datasets.Audio())
    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "disk"))
    hub_like = ds.with_format("arrow").map(embed_table_storage, batched=True).with_format(None)  # as push_to_hub
    hub_like.to_parquet(str(tmp_path / "files" / "data" / "test-00000-of-00001.parquet"))
    for where in ("disk", "files"):
        source = load_audio_source(AudioSourceSpec(str(tmp_path / where), "test"), AudioColumns(text="text"))
        row = source.rows(range(0, 1))[0]
        assert row.audio.data is not None and source.ids[0] == "utt0000"
        np.testing.assert_array_equal(
            decode_audio(row.audio, 16000), decode_audio(AudioRef(str(folder / "utt0000.wav")), 16000)
        )
    with pytest.raises(EncodeError, match=r"no split 'train'; available splits: \['test'\]"):
        load_audio_source(AudioSourceSpec(str(tmp_path / "disk"), "train"), AudioColumns(text="text"))


def test_ids_must_be_unique_and_columns_complete(tmp_path: Path) -> None:
    folder = tmp_path / "af"
    folder.mkdir()
    for sub in ("a", "b"):
        (folder / sub).mkdir()
        soundfile.write(folder / sub / "x.wav", synthetic_wave(0.5, 16000, 1, 1, 0), 16000)
    (folder / "metadata.jsonl").write_text(
        json.dumps({"file_name": "a/x.wav", "transcript": "a", "n": 1}) + "\n"
        + json.dumps({"file_name": "b/x.wav", "transcript": "b", "n": 1}) + "\n"
    )  # fmt: skip
    spec = AudioSourceSpec(str(folder), "train")
    with pytest.raises(EncodeError, match=r"id 'x' of rows 0 and 1 .*is not unique.*set columns.id="):
        load_audio_source(spec, COLUMNS)
    with pytest.raises(EncodeError, match=r"id '1' of rows 0 and 1 \(ids from column 'n'\)"):
        load_audio_source(spec, AudioColumns(id="n"))
    (folder / "metadata.jsonl").write_text(
        json.dumps({"file_name": "a/x.wav", "transcript": "a", "tokenized": ["a"]}) + "\n"
    )
    with pytest.raises(EncodeError, match=r"has alignment column\(s\) \['tokenized'\] but not"):
        load_audio_source(spec, COLUMNS)
    with pytest.raises(EncodeError, match="nowhere: no such local file or folder"):
        load_audio_source(AudioSourceSpec(str(tmp_path / "nowhere"), "train"), COLUMNS)


# --- sharding -------------------------------------------------------------------------------------------


def test_shards_partition_the_split_in_order() -> None:
    for n_rows in (0, 1, 7, 100):
        for num in (1, 3, 8):
            ranges = [shard_range(n_rows, i, num) for i in range(num)]
            assert [r for rng in ranges for r in rng] == list(range(n_rows))


def test_shard_defaults_from_slurm() -> None:
    assert resolve_shard(None, None, {}) == (0, 1, "default")
    assert resolve_shard(2, 5, {"SLURM_ARRAY_TASK_ID": "0"})[:2] == (2, 5)
    array = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "3", "SLURM_ARRAY_TASK_COUNT": "4"}
    assert resolve_shard(None, None, array)[:2] == (2, 4)
    stepped = {
        "SLURM_ARRAY_TASK_ID": "4",
        "SLURM_ARRAY_TASK_MIN": "0",
        "SLURM_ARRAY_TASK_STEP": "2",
        "SLURM_ARRAY_TASK_COUNT": "3",
    }
    assert resolve_shard(None, None, stepped)[:2] == (2, 3)
    srun = {"SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "4", "SLURM_NTASKS": "4"}
    assert resolve_shard(None, None, srun)[:2] == (1, 4)
    assert resolve_shard(None, None, {**array, **srun})[:2] == (9, 16)
    batch_step = {"SLURM_PROCID": "0", "SLURM_NTASKS": "4"}  # the batch script outside srun is one task
    assert resolve_shard(None, None, batch_step)[:2] == (0, 1)
    with pytest.raises(EncodeError, match="give both shard= and num_shards="):
        resolve_shard(1, None, {})
    with pytest.raises(EncodeError, match="need 0 <= shard < num_shards"):
        resolve_shard(4, 4, {})
    with pytest.raises(EncodeError, match="not on the array's range"):
        resolve_shard(None, None, {"SLURM_ARRAY_TASK_ID": "9", "SLURM_ARRAY_TASK_COUNT": "4"})
