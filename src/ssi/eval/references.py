"""What is scored against what: hypotheses from a generations.jsonl, references from the same file or
from a dataset, both keyed by utterance id.

Matching is by id, never by line order, and every inconsistency (bad JSON line, missing field,
duplicate id) is an error naming the file and line or id, because a silently mis-paired WER looks
plausible and is worthless. References come from jsonl/parquet files (path or glob), a `save_to_disk`
folder or a hub dataset id.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ssi.eval.wer import WerInputError

DEFAULT_ID_COLUMNS = ("ID", "id")
DEFAULT_TEXT_COLUMN = "transcript"
_JSONL_SUFFIXES = (".jsonl", ".json")


@dataclass(frozen=True)
class Generation:
    """One hypothesis of a generations.jsonl; `reference` is None when the line carries none."""

    id: str
    text: str
    reference: str | None


def _as_id(value: Any, where: str) -> str:
    # Ids are compared as strings so an int id in one source matches the same id written as text in another.
    if isinstance(value, str) and value:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise WerInputError(f"{where}: id {value!r} is not a non-empty string or an integer")


def _iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line; a line that is not a JSON object is an error."""
    with open(path, "rb") as f:  # bytes, so an encoding error can name its line
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise WerInputError(f"{path}:{number}: not UTF-8 ({err.reason} at byte {err.start})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise WerInputError(f"{path}:{number}: malformed JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(obj, dict):
                raise WerInputError(f"{path}:{number}: expected a JSON object, got {type(obj).__name__}")
            yield number, obj


def read_generations(path: Path) -> list[Generation]:
    """Every line of a generations.jsonl, validated: `id` and `text` present, ids unique."""
    path = Path(path)
    if not path.is_file():
        raise WerInputError(f"{path} is not a file (expected a generations.jsonl)")
    generations: list[Generation] = []
    first_line: dict[str, int] = {}
    for number, obj in _iter_jsonl(path):
        where = f"{path}:{number}"
        if "id" not in obj:
            raise WerInputError(f"{where}: missing 'id'")
        uid = _as_id(obj["id"], where)
        where = f"{where} (id {uid!r})"
        if "text" not in obj:
            raise WerInputError(f"{where}: missing 'text'")
        if not isinstance(obj["text"], str):
            raise WerInputError(f"{where}: 'text' is {type(obj['text']).__name__}, expected a string")
        reference = obj.get("reference")
        if reference is not None and not isinstance(reference, str):
            raise WerInputError(f"{where}: 'reference' is {type(reference).__name__}, expected a string")
        if uid in first_line:
            raise WerInputError(f"{where}: duplicate id, first seen on line {first_line[uid]}")
        first_line[uid] = number
        generations.append(Generation(id=uid, text=obj["text"], reference=reference))
    if not generations:
        raise WerInputError(f"{path} holds no generations")
    return generations


def _pick_id_column(columns: Sequence[str], id_column: str | None, source: str) -> str:
    if id_column is not None:
        return id_column
    for name in DEFAULT_ID_COLUMNS:
        if name in columns:
            return name
    raise WerInputError(
        f"{source}: no id column: none of {list(DEFAULT_ID_COLUMNS)} in columns {list(columns)}; "
        "name it with --id-column"
    )


def _check_columns(columns: Sequence[str], wanted: Sequence[str], source: str) -> None:
    missing = [c for c in wanted if c not in columns]
    if missing:
        raise WerInputError(f"{source}: missing column(s) {missing}; available: {list(columns)}")


def _add_reference(refs: dict[str, str], raw_id: Any, text: Any, where: str, text_column: str) -> None:
    """Add one (id, transcript) pair to `refs`, refusing duplicate ids and non-string transcripts."""
    uid = _as_id(raw_id, where)
    if not isinstance(text, str):
        raise WerInputError(f"{where} (id {uid!r}): {text_column!r} is {type(text).__name__}, expected a string")
    if uid in refs:
        raise WerInputError(f"{where}: duplicate reference id {uid!r}")
    refs[uid] = text


def _add_columns(refs: dict[str, str], ids: Sequence[Any], texts: Sequence[Any], source: str, text_column: str) -> None:
    for row, (raw_id, text) in enumerate(zip(ids, texts, strict=True)):
        _add_reference(refs, raw_id, text, f"{source}, row {row}", text_column)


def _references_from_jsonl(path: Path, id_column: str | None, text_column: str, refs: dict[str, str]) -> None:
    for number, obj in _iter_jsonl(path):
        where = f"{path}:{number}"
        column = _pick_id_column(list(obj), id_column, where)
        _check_columns(list(obj), [column, text_column], where)
        _add_reference(refs, obj[column], obj[text_column], where, text_column)


def _references_from_parquet(path: Path, id_column: str | None, text_column: str, refs: dict[str, str]) -> None:
    import pyarrow.parquet as pq

    names = pq.read_schema(path).names
    column = _pick_id_column(names, id_column, str(path))
    _check_columns(names, [column, text_column], str(path))
    # Read only the two columns: DSU datasets carry large speech_tokens lists that scoring never needs.
    table = pq.read_table(path, columns=[column, text_column])
    _add_columns(refs, table.column(column).to_pylist(), table.column(text_column).to_pylist(), str(path), text_column)


def _references_from_datasets(
    source: str, split: str | None, id_column: str | None, text_column: str
) -> dict[str, str]:
    import datasets

    path = Path(source)
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        loaded = datasets.load_from_disk(str(path))
    else:
        # A hub id, or a local folder of data files; `datasets` resolves both.
        try:
            loaded = datasets.load_dataset(source) if split is None else datasets.load_dataset(source, split=split)
        except (ValueError, FileNotFoundError, ConnectionError) as err:
            raise WerInputError(f"cannot load references from {source!r} (split {split!r}): {err}") from err
    if isinstance(loaded, datasets.DatasetDict):
        if split is None:
            raise WerInputError(
                f"{source} has splits {sorted(loaded)}; choose one with --split "
                "(it is inferred only for generations in the run layout)"
            )
        if split not in loaded:
            raise WerInputError(f"{source} has no split {split!r}; available: {sorted(loaded)}")
        loaded = loaded[split]
    column = _pick_id_column(loaded.column_names, id_column, source)
    _check_columns(loaded.column_names, [column, text_column], source)
    table = loaded.select_columns([column, text_column])
    refs: dict[str, str] = {}
    _add_columns(refs, table[column], table[text_column], source, text_column)
    return refs


def load_references(
    source: str | Path,
    *,
    split: str | None = None,
    id_column: str | None = None,
    text_column: str = DEFAULT_TEXT_COLUMN,
) -> dict[str, str]:
    """id -> reference transcript from jsonl/parquet files (path or glob), a save_to_disk folder or a hub id.

    `id_column` None takes the first of `ID`/`id` present (the MLS DSU schema uses `ID`).
    """
    source = str(source)
    path = Path(source)
    if path.suffix in (*_JSONL_SUFFIXES, ".parquet") and not path.exists() and not glob.has_magic(source):
        raise WerInputError(f"reference file {source} does not exist")
    if path.is_file() or (not path.exists() and glob.has_magic(source)):
        files = [path] if path.is_file() else [Path(p) for p in sorted(glob.glob(source))]
        if not files:
            raise WerInputError(f"no files match {source}")
        refs: dict[str, str] = {}
        for file in files:
            if file.suffix == ".parquet":
                _references_from_parquet(file, id_column, text_column, refs)
            elif file.suffix in _JSONL_SUFFIXES:
                _references_from_jsonl(file, id_column, text_column, refs)
            else:
                raise WerInputError(f"{file}: unsupported reference file type; expected .jsonl, .json or .parquet")
    else:
        refs = _references_from_datasets(source, split, id_column, text_column)
    if not refs:
        raise WerInputError(f"{source} holds no references")
    return refs
