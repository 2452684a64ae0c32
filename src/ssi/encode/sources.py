"""Audio datasets to encode: a hub dataset id, a `save_to_disk` folder, a folder of data files, or an
`audiofolder` (audio files + metadata.jsonl/.csv with a `file_name` column), read without decoding.

`datasets` decodes and even re-encodes audio through torchcodec, which does not exist for torch 2.13, so
audio columns are cast to `Audio(decode=False)` (embedded bytes or a path) and the audiofolder metadata is
read here instead of by `load_dataset("audiofolder")`. Every row gets a unique id (a column, else the
audio file's stem, else `<split>-<row>`), checked over the whole split before any audio is read.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.compute as pc

from ssi.encode import EncodeError
from ssi.encode.audio import AudioRef
from ssi.locations import hub_failure_message, looks_local, missing_path_message

METADATA_FILES = ("metadata.jsonl", "metadata.csv")
AUDIOFOLDER_PATH_COLUMN = "file_name"


@dataclass(frozen=True)
class AudioColumns:
    """Column names in the audio source. `text` null: not read (k-means training); `id` null: from the
    audio file name. The three alignment columns are carried into the output when the source has all."""

    audio: str = "audio"
    text: str | None = "transcript"
    id: str | None = None
    words: str = "tokenized"
    start: str = "aligned_token_start_time"
    end: str = "aligned_token_end_time"

    @classmethod
    def from_mapping(cls, values: dict[str, Any]) -> AudioColumns:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise EncodeError(f"unknown columns.* key(s) {unknown}; known: {sorted(known)}")
        return cls(**{k: (None if v is None else str(v)) for k, v in values.items()})

    def alignment(self) -> tuple[str, str, str]:
        return (self.words, self.start, self.end)


@dataclass(frozen=True)
class AudioSourceSpec:
    """One split of an audio dataset (`config` and `revision` apply to hub datasets)."""

    source: str
    split: str = "test"
    config: str | None = None
    revision: str | None = None


@dataclass(frozen=True)
class AudioRow:
    """One utterance to encode: global row index in the split, id, transcript, audio and word alignment."""

    index: int
    id: str
    text: str | None
    audio: AudioRef
    alignment: tuple[list[str], list[float], list[float]] | None


class AudioSource:
    """The rows of one split, with ids and the columns checked; rows are read by index (a range as a slice)."""

    def __init__(self, ds: datasets.Dataset, spec: AudioSourceSpec, columns: AudioColumns, base_dir: Path | None):
        self.spec, self.columns, self.base_dir = spec, columns, base_dir
        self.name = f"{spec.source}[{spec.split}]"
        available = ds.column_names
        wanted = [columns.audio, *(c for c in (columns.text, columns.id) if c is not None)]
        missing = [c for c in wanted if c not in available]
        if missing:
            raise EncodeError(
                f"{self.name}: missing column(s) {missing}; available columns: {sorted(available)} "
                "(set columns.audio / columns.text / columns.id to this dataset's names)"
            )
        present = [c for c in columns.alignment() if c in available]
        if present and len(present) != 3:
            absent = [c for c in columns.alignment() if c not in available]
            raise EncodeError(f"{self.name}: has alignment column(s) {present} but not {absent}")
        self.has_alignments = bool(present)
        self.ds = _undecoded(ds, columns.audio, self.name)
        self.ids = self._ids()

    def __len__(self) -> int:
        return len(self.ds)

    def _audio_paths(self) -> list[str | None]:
        column = self.ds.with_format("arrow")[self.columns.audio]
        if pa.types.is_struct(column.type):
            column = pc.struct_field(column, "path")
        return column.to_pylist()

    def _ids(self) -> list[str]:
        if self.columns.id is not None:
            values = self.ds.with_format("arrow")[self.columns.id].to_pylist()
            for row, value in enumerate(values):
                if value is None or str(value) == "":
                    raise EncodeError(f"{self.name}: row {row} has no id in column {self.columns.id!r}")
            ids = [str(v) for v in values]
            how = f"column {self.columns.id!r}"
        else:
            paths = self._audio_paths()
            if all(paths):
                ids, how = [Path(str(p)).stem for p in paths], "the audio file names (set columns.id to use a column)"
            else:
                ids, how = [f"{self.spec.split}-{i:08d}" for i in range(len(paths))], "row numbers (no file names)"
        first: dict[str, int] = {}
        for row, sample_id in enumerate(ids):
            if sample_id in first:
                raise EncodeError(
                    f"{self.name}: id {sample_id!r} of rows {first[sample_id]} and {row} (ids from {how}) is not "
                    "unique; generations are matched to references by id: set columns.id=<a column of unique ids>"
                )
            first[sample_id] = row
        return ids

    def rows(self, indices: Sequence[int]) -> list[AudioRow]:
        """The rows at `indices`, in that order (a contiguous range is read as one slice)."""
        if isinstance(indices, range) and indices.step == 1:
            batch = self.ds[indices.start : indices.stop]
        else:
            batch = self.ds[list(indices)]
        cols = self.columns
        out = []
        for offset, (index, value) in enumerate(zip(indices, batch[cols.audio], strict=True)):
            text = None
            if cols.text is not None:
                text = batch[cols.text][offset]
                if text is None:
                    raise EncodeError(f"{self.name}: row {index} (id {self.ids[index]!r}) has no {cols.text!r} text")
                text = str(text)
            alignment = None
            if self.has_alignments:
                alignment = (
                    [str(w) for w in batch[cols.words][offset] or []],
                    [float(t) for t in batch[cols.start][offset] or []],
                    [float(t) for t in batch[cols.end][offset] or []],
                )
            out.append(AudioRow(int(index), self.ids[index], text, self._ref(value), alignment))
        return out

    def _ref(self, value: Any) -> AudioRef:
        if isinstance(value, dict):
            path, data = value.get("path"), value.get("bytes")
        else:
            path, data = value, None
        if data is None and path and self.base_dir is not None and not Path(path).is_absolute():
            path = str(self.base_dir / path)
        return AudioRef(None if path is None else str(path), data)


def _undecoded(ds: datasets.Dataset, column: str, name: str) -> datasets.Dataset:
    """The dataset with its audio column as `{bytes, path}` (an Audio feature) or a path string."""
    feature = ds.features[column]
    if isinstance(feature, datasets.Audio):
        return ds.cast_column(column, datasets.Audio(decode=False))
    if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
        return ds
    if isinstance(feature, dict) and {"bytes", "path"} <= set(feature):
        return ds
    raise EncodeError(
        f"{name}: column {column!r} holds {feature}, not audio (an Audio feature, a path string or {{bytes, path}})"
    )


def load_audio_source(spec: AudioSourceSpec, columns: AudioColumns) -> AudioSource:
    """Open one split of an audio dataset (nothing is decoded yet)."""
    path = Path(spec.source).expanduser()
    if path.is_dir():
        metadata = _metadata_file(path, spec.split)
        if metadata is not None:
            return AudioSource(_read_audiofolder(metadata, columns), spec, columns, metadata.parent)
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return AudioSource(_load_from_disk(path, spec.split), spec, columns, path)
        if not _data_files(path):
            raise EncodeError(_not_an_audio_dataset(path, spec.split))
        return AudioSource(_load_dataset(str(path), spec), spec, columns, path)
    if path.exists() or path.suffix:
        raise EncodeError(
            f"source {spec.source!r} is not a folder: give a hub dataset id, a save_to_disk folder, a folder of "
            "data files, or an audiofolder (audio files + metadata.jsonl/.csv)"
        )
    if looks_local(spec.source):
        raise EncodeError(missing_path_message("source", spec.source))
    return AudioSource(_load_dataset(spec.source, spec, hub=True), spec, columns, None)


DATA_FILE_SUFFIXES = (".parquet", ".arrow", ".jsonl", ".json", ".csv")


def _data_files(folder: Path) -> list[Path]:
    """Data files `datasets` would read from a folder (at its top or in its split folders / data/)."""
    return [p for p in folder.rglob("*") if p.suffix in DATA_FILE_SUFFIXES and p.name not in METADATA_FILES][:1]


def _not_an_audio_dataset(folder: Path, split: str) -> str:
    """Why `folder` cannot be read, with what is in it (a folder of wav files without metadata, usually)."""
    entries = sorted(folder.iterdir())
    shown = []
    for entry in entries[:6]:
        if entry.is_dir():
            kinds = sorted({p.suffix or p.name for p in entry.iterdir()})[:4]
            shown.append(f"{entry.name}/ ({len(list(entry.iterdir()))} entries: {', '.join(kinds)})")
        else:
            shown.append(entry.name)
    found = ", ".join(shown) + (", ..." if len(entries) > 6 else "") if entries else "nothing"
    return (
        f"source={folder}: no audiofolder metadata ({folder}/{split}/metadata.csv|jsonl or {folder}/metadata.csv|jsonl "
        f"with a file_name column), no save_to_disk dataset and no data files; found: {found} "
        "(docs/encoding.md, 'Your own corpus')"
    )


def _metadata_file(folder: Path, split: str) -> Path | None:
    """audiofolder metadata: `<folder>/<split>/metadata.*` if present, else `<folder>/metadata.*`."""
    for directory in (folder / split, folder):
        found = [directory / name for name in METADATA_FILES if (directory / name).is_file()]
        if len(found) > 1:
            raise EncodeError(f"{directory}: both {found[0].name} and {found[1].name}; keep one metadata file")
        if found:
            return found[0]
    return None


def _read_audiofolder(metadata: Path, columns: AudioColumns) -> datasets.Dataset:
    """Metadata rows with `file_name` turned into the audio path column (relative to the metadata file)."""
    if metadata.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise EncodeError(f"{metadata}: line {number} is not JSON: {err}") from None
    else:
        with metadata.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    if not rows:
        raise EncodeError(f"{metadata}: no rows")
    for number, row in enumerate(rows):
        if not row.get(AUDIOFOLDER_PATH_COLUMN):
            raise EncodeError(f"{metadata}: row {number} has no {AUDIOFOLDER_PATH_COLUMN!r} (the audio file)")
        row[columns.audio] = str(row.pop(AUDIOFOLDER_PATH_COLUMN))
    return datasets.Dataset.from_list(rows)


def _load_from_disk(path: Path, split: str) -> datasets.Dataset:
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise EncodeError(f"{path}: no split {split!r}; available splits: {sorted(loaded)}")
        return loaded[split]
    return loaded


def _load_dataset(name: str, spec: AudioSourceSpec, hub: bool = False) -> datasets.Dataset:
    try:
        return datasets.load_dataset(name, spec.config, split=spec.split, revision=spec.revision)
    except (FileNotFoundError, ValueError, ConnectionError, RuntimeError, OSError, ImportError) as err:
        if hub and not isinstance(err, ValueError):
            where = f" (config {spec.config!r}, split {spec.split!r})"
            raise EncodeError(hub_failure_message("source", name, err) + where) from None
        message = " ".join(str(err).split())
        raise EncodeError(f"cannot load {name!r} (config {spec.config!r}, split {spec.split!r}): {message}") from None
