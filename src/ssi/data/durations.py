"""Each utterance's duration, read once per corpus and kept in a manifest (as Lhotse and NeMo keep theirs).

Audio splits batch by seconds, so every row's duration is needed at start-up. Reading it from the audio on every
rank at every start (and again for each split that generation builds) pulled every embedded utterance into memory:
about 60 GB per rank per start for LibriSpeech 960 h. Here a row's duration is read from its header only (embedded
bytes are read through a zero-copy view of the memory-mapped Arrow data, so only the pages the header reader touches
are read from disk), and kept in a manifest under `data.duration_cache` (default `~/.cache/ssi/durations`).

A manifest is named by a hash of the source (path or hub id, split, config, revision, audio and id columns) and, for
embedded bytes, of the loaded data (`datasets`' fingerprint and its Arrow cache files' names, sizes and mtimes: a
changed parquet file, hub revision or `save_to_disk` folder is a new manifest). It holds one entry per row (id,
size, mtime_ns, seconds); an entry is used only when the row's id and content key still match (embedded: the byte
length; files: size and mtime_ns), so a changed audio file is re-read alone (a source that gained or lost rows is
read again whole). Writes are atomic (temporary file, then
rename). Under torch.distributed the ranks split what is missing, gather it, and each node's local rank 0 writes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import soundfile
import torch
import torch.distributed as dist
from tqdm import tqdm

from ssi.data.sources import DataValidationError
from ssi.encode.audio import AudioRef
from ssi.encode.sources import AudioSource

LOGGER = logging.getLogger(__name__)

MANIFEST_VERSION = 1
_SCHEMA = pa.schema([("id", pa.string()), ("size", pa.int64()), ("mtime_ns", pa.int64()), ("seconds", pa.float64())])
_READ_ERRORS = (soundfile.LibsndfileError, RuntimeError, OSError, TypeError, ValueError)


def duration_cache_dir(value: Any) -> Path | None:
    """`data.duration_cache`: null = `$XDG_CACHE_HOME/ssi/durations` (`~/.cache/...`), false = no manifest, else a
    folder."""
    if value is False:
        return None
    if value is None:
        return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ssi" / "durations"
    return Path(str(value)).expanduser()


class _View:
    """A read-only file over a memoryview: soundfile reads the header through it, and only the pages it touches
    of a memory-mapped Arrow file are read from disk (io.BytesIO would copy the whole utterance)."""

    def __init__(self, view: memoryview) -> None:
        self.view, self.pos = view, 0

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = max(0, offset + (0, self.pos, len(self.view))[whence])
        return self.pos

    def tell(self) -> int:
        return self.pos

    def read(self, size: int = -1) -> bytes:
        end = len(self.view) if size < 0 else min(len(self.view), self.pos + size)
        out = bytes(self.view[self.pos : end])
        self.pos = max(self.pos, end)
        return out


@dataclass
class _Row:
    """Where one row's audio is: a view of its embedded bytes, else a file; `size`/`mtime_ns` are its content key.
    An embedded row's name is read only for an error message (the path strings lie after the bytes in a record
    batch: reading them would page in another read-ahead window of audio per batch)."""

    view: memoryview | None
    file: str | None
    size: int
    mtime_ns: int
    names: pa.Array | None = None
    at: int = 0

    def ref(self) -> AudioRef:
        if self.view is None:
            return AudioRef(self.file, None)
        return AudioRef(None if self.names is None else self.names[self.at].as_py(), bytes(self.view))


_Chunk = tuple[pa.Array | None, np.ndarray | None, memoryview | None, np.ndarray | None]


def _chunk_audio(chunk: pa.Array) -> _Chunk:
    """One Arrow chunk's paths, and its embedded bytes as value offsets into a zero-copy view with a validity mask
    (a null value is a row with a path only); None where the chunk has no bytes."""
    if not pa.types.is_struct(chunk.type):
        return chunk, None, None, None
    paths, data = pc.struct_field(chunk, "path"), pc.struct_field(chunk, "bytes")
    if data.null_count == len(data):
        return paths, None, None, None
    _, offsets, values = data.buffers()[:3]
    wide = pa.types.is_large_binary(data.type)
    offsets = np.frombuffer(offsets, dtype=np.int64 if wide else np.int32)[data.offset : data.offset + len(data) + 1]
    valid = data.is_valid().to_numpy(zero_copy_only=False)
    return paths, offsets.astype(np.int64), memoryview(values) if values is not None else memoryview(b""), valid


def _audio_rows(source: AudioSource, rows: Sequence[int]) -> list[_Row]:
    """The audio of `rows` without copying embedded bytes: views into the (memory-mapped) Arrow buffers."""
    indices = np.asarray(rows, dtype=np.int64)
    if source.ds._indices is not None:  # a selected/shuffled dataset: rows are positions in its indices mapping
        indices = source.ds._indices.column(0).to_numpy()[indices]
    column = source.ds.data.table.column(source.columns.audio)
    starts = np.cumsum([0] + [len(c) for c in column.chunks])
    chunk_of = np.searchsorted(starts, indices, side="right") - 1
    chunks: dict[int, _Chunk] = {}
    out: list[_Row] = []
    for row, k in zip(indices.tolist(), chunk_of.tolist(), strict=True):
        if k not in chunks:
            chunks[k] = _chunk_audio(column.chunks[k])
        paths, offsets, values, valid = chunks[k]
        i = row - int(starts[k])
        if offsets is not None and values is not None and valid is not None and valid[i]:
            start, end = int(offsets[i]), int(offsets[i + 1])
            out.append(_Row(values[start:end], None, end - start, -1, paths, i))
            continue
        path = None if paths is None else paths[i].as_py()
        if path and source.base_dir is not None and not Path(path).is_absolute():
            path = str(source.base_dir / path)
        try:
            stat = os.stat(path) if path else None
        except OSError:
            stat = None
        out.append(_Row(None, path, -1 if stat is None else stat.st_size, -1 if stat is None else stat.st_mtime_ns))
    return out


def header_seconds(row: _Row) -> float:
    """An utterance's duration from its header alone (no decoding; embedded bytes are not copied)."""
    if row.view is None and not row.file:
        raise ValueError("no audio (neither bytes nor a path)")
    info = soundfile.info(_View(row.view) if row.view is not None else row.file)
    return info.frames / info.samplerate


def source_key(source: AudioSource) -> dict[str, Any]:
    """What names a manifest: the source, and for embedded bytes the loaded data itself."""
    spec, cols = source.spec, source.columns
    local = Path(spec.source).expanduser()
    key: dict[str, Any] = {
        "version": MANIFEST_VERSION,
        "source": str(local.resolve()) if local.exists() else spec.source,
        "split": spec.split,
        "config": spec.config,
        "revision": spec.revision,
        "audio": cols.audio,
        "id": cols.id,
    }
    if source.ds.data.table.schema.field(cols.audio).type != pa.string():  # bytes may be embedded: the data too
        files = []
        for entry in source.ds.cache_files:
            stat = os.stat(entry["filename"])
            files.append([entry["filename"], stat.st_size, stat.st_mtime_ns])
        key["fingerprint"] = source.ds._fingerprint
        key["files"] = files
    return key


def manifest_path(cache_dir: Path, source: AudioSource) -> Path:
    digest = hashlib.sha256(json.dumps(source_key(source), sort_keys=True).encode()).hexdigest()[:32]
    return cache_dir / f"{digest}.parquet"


def _load(path: Path, n: int) -> pa.Table | None:
    try:
        table = pq.read_table(path, schema=_SCHEMA)
    except (OSError, pa.ArrowInvalid) as err:
        if path.exists():
            LOGGER.warning("duration manifest %s is unreadable (%s): reading the headers again", path, err)
        return None
    return table if table.num_rows == n else None


def _write(path: Path, ids: list[str], size: np.ndarray, mtime: np.ndarray, seconds: np.ndarray, key: dict) -> None:
    """Atomically: a reader sees the old manifest or the new one, never a part."""
    table = pa.table({"id": ids, "size": size, "mtime_ns": mtime, "seconds": seconds}, schema=_SCHEMA)
    table = table.replace_schema_metadata({"ssi.source": json.dumps(key, sort_keys=True)})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def _group() -> tuple[int, int] | None:
    """(rank, world size) under torch.distributed with several ranks, else None."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank(), dist.get_world_size()
    return None


def _all_reduce(values: np.ndarray, op: str) -> np.ndarray:
    """`values` reduced over all ranks (on the rank's GPU under NCCL)."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    tensor = torch.from_numpy(values).to(device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return tensor.cpu().numpy()


def _refuse(source: AudioSource, sample_id: str, row: _Row) -> None:
    """Raise the error that names why `row` has no duration."""
    try:
        seconds = header_seconds(row)
    except _READ_ERRORS as err:
        raise DataValidationError(
            f"{source.name}: sample {sample_id!r}: cannot read {row.ref().describe()}: {err}"
        ) from None
    if not seconds > 0:
        raise DataValidationError(f"{source.name}: sample {sample_id!r}: {row.ref().describe()} is empty")


def read_durations(
    source: AudioSource, rows: Sequence[int], cache_dir: Path | None = None, progress: bool = False
) -> list[float]:
    """Seconds of audio of each of `rows`: from the manifest where its entry still matches, else from the header
    (then written back). An unreadable or empty row is refused naming its id, and never cached. `cache_dir` None:
    no manifest (every header is read).

    Under torch.distributed every rank takes part: the rows missing on any rank are split over the ranks, each
    reads the headers of its share, the durations are summed over ranks, and each node's local rank 0 writes the
    manifest, so a first build takes 1/world size of the time and later starts read none."""
    began, group = time.perf_counter(), _group()
    audio = _audio_rows(source, rows)
    wanted = np.asarray(rows, dtype=np.int64)
    size = np.array([a.size for a in audio], dtype=np.int64)
    mtime = np.array([a.mtime_ns for a in audio], dtype=np.int64)
    n = len(source)
    path = None if cache_dir is None else manifest_path(Path(cache_dir).expanduser(), source)
    table = None if path is None else _load(path, n)
    if table is None:
        all_ids: list[str | None] = [None] * n
        all_size = np.full(n, -1, dtype=np.int64)
        all_mtime = np.full(n, -1, dtype=np.int64)
        all_seconds = np.full(n, np.nan)
    else:
        all_ids = table.column("id").to_pylist()
        all_size = table.column("size").to_numpy().copy()
        all_mtime = table.column("mtime_ns").to_numpy().copy()
        all_seconds = table.column("seconds").to_numpy(zero_copy_only=False).copy()
    ids = [source.ids[r] for r in rows]
    same = np.array([all_ids[r] == i for r, i in zip(rows, ids, strict=True)], dtype=bool)
    if len(rows):
        same &= (all_size[wanted] == size) & (all_mtime[wanted] == mtime) & (all_seconds[wanted] > 0)
    stale = (~same).astype(np.int32)
    missing = np.flatnonzero(_all_reduce(stale, "max") if group else stale)
    if not missing.size:
        return all_seconds[wanted].tolist()
    rank, world = group or (0, 1)
    read = np.zeros(missing.size)
    share = range(rank, missing.size, world)
    for j in tqdm(share, desc=f"reading audio headers of {source.name}", disable=not progress):
        k = int(missing[j])
        try:
            read[j] = header_seconds(audio[k])
        except _READ_ERRORS:
            read[j] = np.nan
        if group is None and not read[j] > 0:
            _refuse(source, ids[k], audio[k])
    if group:  # every rank holds zeros outside its share
        read = _all_reduce(read, "sum")
    bad = np.flatnonzero(~(read > 0))
    if bad.size:
        k = int(missing[bad[0]])
        _refuse(source, ids[k], audio[k])
    at = wanted[missing]
    for j, k in enumerate(missing.tolist()):
        all_ids[int(at[j])] = ids[k]
    all_size[at], all_mtime[at], all_seconds[at] = size[missing], mtime[missing], read
    if path is not None and (group is None or _local_rank_zero()):
        try:
            _write(path, all_ids, all_size, all_mtime, all_seconds, source_key(source))
        except OSError as err:
            LOGGER.warning("cannot write the duration manifest %s (%s): headers are read again next start", path, err)
    durations = all_seconds[wanted].tolist()
    LOGGER.info(
        "%s: read %d audio headers in %.1f s on %d rank(s) (%.2f h of audio in %d rows; %d from the manifest%s)",
        source.name, missing.size, time.perf_counter() - began, world, sum(durations) / 3600, len(rows),
        len(rows) - missing.size, f" {path}" if path is not None else "",
    )  # fmt: skip
    return durations


def _local_rank_zero() -> bool:
    return int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))) == 0
