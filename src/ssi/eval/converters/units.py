"""Encoded audio, looked up by file: the `{file: units}` tables benchmark converters read.

A table is what `scripts/encode_audio.py` writes (a folder of parquet shards in the MLS schema, `ID` = the
audio file's stem) or any parquet/jsonl file, glob or folder of them with an id column and a units column.
Keys are matched to audio files by their path relative to the benchmark root without the extension
(`bg_alignment/sample_3_0`), else by their stem when no other file of the benchmark shares it.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterable
from pathlib import Path

import pyarrow.parquet as pq

from ssi.eval.items import BenchmarkError

ID_COLUMNS = ("ID", "id", "file", "filename", "path")
UNITS_COLUMNS = ("speech_tokens", "units")
AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".opus")


def _key(name: str) -> str:
    """A table key or a relative audio path in one spelling: posix separators, no audio extension."""
    key = name.replace("\\", "/").strip("/")
    for suffix in AUDIO_SUFFIXES:
        if key.lower().endswith(suffix):
            return key[: -len(suffix)]
    return key


def _table_files(source: str) -> list[Path]:
    path = Path(source).expanduser()
    if path.is_dir():
        files = [
            p
            for p in sorted(path.rglob("*"))
            if p.suffix in (".parquet", ".jsonl")
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        ]
    else:
        files = [Path(p) for p in sorted(glob.glob(str(path)))]
    if not files:
        raise BenchmarkError(f"units table {source!r}: no .parquet or .jsonl file found")
    for file in files:
        if file.suffix not in (".parquet", ".jsonl"):
            raise BenchmarkError(f"units table {file}: expected .parquet or .jsonl")
    return files


def _pick(columns: Iterable[str], wanted: str | None, candidates: tuple[str, ...], what: str, file: Path) -> str:
    columns = list(columns)
    if wanted is not None:
        if wanted not in columns:
            raise BenchmarkError(f"units table {file}: no column {wanted!r} ({what}); columns: {columns}")
        return wanted
    for name in candidates:
        if name in columns:
            return name
    raise BenchmarkError(f"units table {file}: none of {list(candidates)} ({what}); columns: {columns} (set --{what})")


class UnitsTable:
    """Units by file key, merged over every file of the table; a key given twice with different units is an error."""

    def __init__(self, source: str, id_column: str | None = None, units_column: str | None = None) -> None:
        self.source = source
        self.units: dict[str, list[int]] = {}
        for file in _table_files(source):
            if file.suffix == ".parquet":
                names = pq.read_schema(file).names
                id_col = _pick(names, id_column, ID_COLUMNS, "id_column", file)
                units_col = _pick(names, units_column, UNITS_COLUMNS, "units_column", file)
                table = pq.read_table(file, columns=[id_col, units_col])
                rows = zip(table.column(id_col).to_pylist(), table.column(units_col).to_pylist(), strict=True)
            else:
                rows = self._jsonl_rows(file, id_column, units_column)
            for key, units in rows:
                self._add(str(key), units, file)
        self._by_stem: dict[str, list[str]] = {}
        for key in self.units:
            self._by_stem.setdefault(key.rsplit("/", 1)[-1], []).append(key)

    @staticmethod
    def _jsonl_rows(file: Path, id_column: str | None, units_column: str | None) -> Iterable[tuple[str, list[int]]]:
        with file.open(encoding="utf-8") as lines:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise BenchmarkError(f"units table {file}:{number}: not valid JSON ({err})") from None
                id_col = _pick(row, id_column, ID_COLUMNS, "id_column", file)
                units_col = _pick(row, units_column, UNITS_COLUMNS, "units_column", file)
                yield str(row[id_col]), row[units_col]

    def _add(self, key: str, units: list[int] | None, file: Path) -> None:
        key = _key(key)
        if not isinstance(units, list) or not all(isinstance(u, int) for u in units):
            raise BenchmarkError(f"units table {file}: {key!r} has no list of integer units")
        known = self.units.setdefault(key, units)
        if known != units:
            raise BenchmarkError(f"units table {self.source}: {key!r} appears twice with different units")

    def lookup(self, relative: str, ambiguous_stems: set[str] = frozenset()) -> list[int]:
        """The units of the audio file at `relative` (to the benchmark root). A stem-only key is used only
        when the stem is not in `ambiguous_stems` (stems several benchmark files share)."""
        key = _key(relative)
        if key in self.units:
            return self.units[key]
        stem = key.rsplit("/", 1)[-1]
        if stem in ambiguous_stems:
            raise BenchmarkError(
                f"units table {self.source}: no key {key!r}, and its stem {stem!r} names several benchmark files: "
                "key the table by path relative to the benchmark root, or give one table per folder"
            )
        matches = self._by_stem.get(stem, [])
        if len(matches) == 1:
            return self.units[matches[0]]
        if len(matches) > 1:
            raise BenchmarkError(f"units table {self.source}: stem {stem!r} matches several keys {matches[:3]}")
        raise BenchmarkError(f"units table {self.source}: no units for {relative!r} (keys are file stems or paths)")
