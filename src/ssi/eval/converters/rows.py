"""Rows of a published text benchmark: local csv/tsv/parquet/jsonl files (a path, glob or folder) or a hub
dataset (downloaded by `datasets`, cached as usual)."""

from __future__ import annotations

import csv
import glob
import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from ssi.eval.items import BenchmarkError

SUFFIXES = (".csv", ".tsv", ".parquet", ".jsonl")


def local_files(source: str) -> list[Path] | None:
    """The data files a local source names, or None when it is not a local path (a hub id)."""
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES)
        if not files:
            raise BenchmarkError(f"{source}: no {'/'.join(SUFFIXES)} file in this folder")
        return files
    if path.is_file():
        return [path]
    matches = sorted(Path(p) for p in glob.glob(str(path)))
    if matches:
        return matches
    if any(c in source for c in "*?[") or source.startswith((".", "/", "~")) or Path(source).suffix in SUFFIXES:
        raise BenchmarkError(f"{source}: no such file")
    return None


def read_file(path: Path) -> list[dict[str, Any]]:
    if path.suffix in (".csv", ".tsv"):
        with path.open(newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ","))
    if path.suffix == ".parquet":
        return pq.read_table(path).to_pylist()
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    raise BenchmarkError(f"{path}: expected one of {SUFFIXES}")


def hub_rows(source: str, config: str | None, split: str, revision: str | None = None) -> list[dict[str, Any]]:
    import datasets

    try:
        return list(datasets.load_dataset(source, config, split=split, revision=revision))
    except (FileNotFoundError, ValueError, ConnectionError) as err:
        raise BenchmarkError(f"cannot load {source!r} (config {config}, split {split}) from the hub: {err}") from None


def need_columns(row: dict[str, Any], columns: tuple[str, ...], where: str) -> None:
    missing = [c for c in columns if c not in row]
    if missing:
        raise BenchmarkError(f"{where}: missing column(s) {missing}; columns: {sorted(row)}")
