"""Durations are read from the audio once per corpus (ssi.data.durations): a second start reads the manifest, not
one header and no utterance's bytes; a changed utterance's new duration is used (a changed parquet file is a new
manifest; a changed audiofolder file is re-read alone); two gloo ranks split the headers and read them once."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile
import torch.distributed as dist
import torch.multiprocessing as mp

from ssi.data import durations as durations_module
from ssi.data.durations import duration_cache_dir, read_durations
from ssi.data.sources import DataValidationError
from ssi.encode.sources import AudioColumns, AudioSource, AudioSourceSpec, load_audio_source

RATE = 16000
COLUMNS = AudioColumns(audio="audio", text="transcript", id="ID")


def wav(seconds: float, fmt: str = "WAV") -> bytes:
    out = io.BytesIO()
    soundfile.write(out, np.zeros(int(seconds * RATE), dtype=np.float32), RATE, format=fmt)
    return out.getvalue()


def write_parquet(folder: Path, seconds: list[float]) -> Path:
    """A folder of one parquet file whose rows embed their audio (as hub datasets do), FLAC and WAV mixed."""
    folder.mkdir(parents=True, exist_ok=True)
    audio = [{"bytes": wav(s, "FLAC" if i % 2 else "WAV"), "path": f"u{i}.wav"} for i, s in enumerate(seconds)]
    table = pa.table(
        {"ID": [f"u{i}" for i in range(len(seconds))], "transcript": ["a b"] * len(seconds), "audio": audio}
    )
    pq.write_table(table, folder / "train.parquet")
    return folder


def write_audiofolder(folder: Path, seconds: list[float]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "metadata.jsonl").open("w") as f:
        for i, s in enumerate(seconds):
            (folder / f"u{i}.wav").write_bytes(wav(s))
            f.write(json.dumps({"file_name": f"u{i}.wav", "transcript": "a b", "ID": f"u{i}"}) + "\n")
    return folder


def source(folder: Path) -> AudioSource:
    return load_audio_source(AudioSourceSpec(str(folder), "train"), COLUMNS)


@pytest.fixture
def header_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts header reads; reading a whole row (AudioSource.rows) is an error here."""
    reads: list[int] = []
    read = durations_module.header_seconds

    def counted(row):
        reads.append(1)
        return read(row)

    def no_rows(self, indices):
        raise AssertionError("durations must not read whole rows")

    monkeypatch.setattr(durations_module, "header_seconds", counted)
    monkeypatch.setattr(AudioSource, "rows", no_rows)
    return reads


def test_a_second_start_reads_the_manifest_and_a_changed_utterance_is_read_again(tmp_path, header_reads) -> None:
    seconds = [0.25 * (i + 1) for i in range(12)]
    corpus, cache = write_parquet(tmp_path / "corpus", seconds), tmp_path / "cache"
    rows = list(range(12))
    assert read_durations(source(corpus), rows, cache) == pytest.approx(seconds)
    assert len(header_reads) == 12 and len(list(cache.glob("*.parquet"))) == 1
    header_reads.clear()
    assert read_durations(source(corpus), rows[::-1], cache) == pytest.approx(seconds[::-1])  # a new start
    assert header_reads == []
    changed = [*seconds[:5], 7.5, *seconds[6:]]
    write_parquet(corpus, changed)  # one utterance's audio changes: a new file, so a new manifest
    assert read_durations(source(corpus), rows, cache) == pytest.approx(changed)
    assert len(header_reads) == 12


def test_a_subset_is_completed_and_a_changed_audiofolder_file_is_read_alone(tmp_path, header_reads) -> None:
    seconds = [0.5 + 0.1 * i for i in range(8)]
    corpus, cache = write_audiofolder(tmp_path / "corpus", seconds), tmp_path / "cache"
    assert read_durations(source(corpus), [0, 1, 2], cache) == pytest.approx(seconds[:3])  # n_samples=3
    assert read_durations(source(corpus), list(range(8)), cache) == pytest.approx(seconds)
    assert len(header_reads) == 8  # the first three were kept
    header_reads.clear()
    (corpus / "u3.wav").write_bytes(wav(4.0))
    os.utime(corpus / "u3.wav", ns=(1, 1))  # a changed file, even within the clock's resolution
    assert read_durations(source(corpus), list(range(8)), cache) == pytest.approx([*seconds[:3], 4.0, *seconds[4:]])
    assert len(header_reads) == 1
    header_reads.clear()
    assert read_durations(source(corpus), list(range(8)), None) == pytest.approx([*seconds[:3], 4.0, *seconds[4:]])
    assert len(header_reads) == 8  # no manifest: every header


def test_unreadable_and_empty_rows_are_refused_by_id_and_never_cached(tmp_path) -> None:
    corpus, cache = write_audiofolder(tmp_path / "corpus", [0.5, 0.5]), tmp_path / "cache"
    (corpus / "u1.wav").write_bytes(b"not audio")
    for _ in range(2):
        with pytest.raises(DataValidationError, match="sample 'u1': cannot read file"):
            read_durations(source(corpus), [0, 1], cache)
    (corpus / "u1.wav").write_bytes(wav(0.0))
    with pytest.raises(DataValidationError, match="sample 'u1': .* is empty"):
        read_durations(source(corpus), [0, 1], cache)


def test_an_unreadable_embedded_row_is_refused_by_id_and_name(tmp_path) -> None:
    corpus = tmp_path / "corpus"
    write_parquet(corpus, [0.5, 0.5])
    table = pq.read_table(corpus / "train.parquet").to_pylist()
    table[1]["audio"]["bytes"] = b"RIFF junk"
    pq.write_table(pa.Table.from_pylist(table), corpus / "train.parquet")
    with pytest.raises(DataValidationError, match=r"sample 'u1': cannot read embedded audio 'u1.wav'"):
        read_durations(source(corpus), [0, 1], tmp_path / "cache")


def test_the_cache_key() -> None:
    assert duration_cache_dir(False) is None
    assert duration_cache_dir(None).parts[-2:] == ("ssi", "durations")
    assert duration_cache_dir("~/d") == Path.home() / "d"


def _rank(rank: int, corpus: str, cache: str, init: str, out: str) -> None:
    os.environ["LOCAL_RANK"] = str(rank)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    reads: list[int] = []
    read = durations_module.header_seconds
    durations_module.header_seconds = lambda row: reads.append(1) or read(row)
    got = read_durations(source(Path(corpus)), list(range(6)), Path(cache))
    first = len(reads)
    again = read_durations(source(Path(corpus)), list(range(6)), Path(cache))  # a resume
    Path(out, f"{rank}.json").write_text(json.dumps({"reads": [first, len(reads) - first], "seconds": [got, again]}))
    dist.destroy_process_group()


def test_two_gloo_ranks_split_the_headers_and_read_them_once(tmp_path) -> None:
    seconds = [0.2 * (i + 1) for i in range(6)]
    corpus = write_parquet(tmp_path / "corpus", seconds)
    source(corpus)  # datasets converts the parquet file once, before the ranks start
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_rank, args=(str(corpus), str(tmp_path / "cache"), init, str(tmp_path)), nprocs=2)
    results = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    assert [r["reads"] for r in results] == [[3, 0], [3, 0]]  # half each, then the manifest
    for r in results:
        assert r["seconds"][0] == pytest.approx(seconds) and r["seconds"][1] == pytest.approx(seconds)
    assert len(list((tmp_path / "cache").glob("*.parquet"))) == 1


def _rank_refusing(rank: int, corpus: str, init: str, out: str) -> None:
    os.environ["LOCAL_RANK"] = str(rank)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        read_durations(source(Path(corpus)), list(range(4)), Path(out, "cache"))
    except DataValidationError as err:
        Path(out, f"{rank}.txt").write_text(str(err))
    dist.destroy_process_group()


def test_a_bad_row_read_by_one_rank_is_refused_by_every_rank(tmp_path) -> None:
    corpus = write_audiofolder(tmp_path / "corpus", [0.5] * 4)
    (corpus / "u3.wav").write_bytes(b"not audio")  # rank 1's share
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_rank_refusing, args=(str(corpus), init, str(tmp_path)), nprocs=2)
    for rank in range(2):
        assert "sample 'u3': cannot read file" in (tmp_path / f"{rank}.txt").read_text()
