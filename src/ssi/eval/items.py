"""The item format every likelihood benchmark is converted to (docs/evaluation.md, "Items"), read and checked.

One JSON object per line: `id`, optional `prefix`, `positive`, `negative` (each `{"units": [int, ...]}` or
`{"text": "..."}`), optional `category`, optional `meta` (copied to the scores) and optional `zerospeech`
(the wav stems the candidates came from, for the ZeroSpeech 2021 submission files). Every problem is
reported with the file, line and item id.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ssi.files import atomic_write_text

SPEECH, TEXT = "speech", "text"
ZEROSPEECH_TASKS = ("lexical", "syntactic")
ZEROSPEECH_SPLITS = ("dev", "test")
_KEYS = {"id", "prefix", "positive", "negative", "category", "meta", "zerospeech"}
_ZEROSPEECH_KEYS = {"task", "split", "positive", "negative", "pair"}
# The official breakdowns a pair belongs to (lexical: `frequency` band and `length`; syntactic: `type`).
_ZEROSPEECH_OPTIONAL = {"groups"}


class BenchmarkError(ValueError):
    """A benchmark file or item that cannot be scored as given; the message names the file, line and id."""


@dataclass(frozen=True)
class Segment:
    """A prefix or candidate: speech units or text, never both."""

    units: tuple[int, ...] | None = None
    text: str | None = None

    @property
    def modality(self) -> str:
        return SPEECH if self.units is not None else TEXT

    def to_json(self) -> dict[str, Any]:
        return {"units": list(self.units)} if self.units is not None else {"text": self.text}


@dataclass(frozen=True)
class ZeroSpeechRef:
    """Where a ZeroSpeech 2021 item came from: the wav stems of both candidates, the scorer's pair key
    (lexical: the gold `id`; syntactic: `type/subtype/id`), over which the official score averages voices,
    and the official breakdowns the pair belongs to (`groups`, e.g. `(("frequency", "6-20"), ("length", "5"))`)."""

    task: str
    split: str
    positive: str
    negative: str
    pair: str
    groups: tuple[tuple[str, str], ...] = ()

    def to_json(self) -> dict[str, Any]:
        row: dict[str, Any] = {k: getattr(self, k) for k in ("task", "split", "positive", "negative", "pair")}
        if self.groups:
            row["groups"] = dict(self.groups)
        return row


@dataclass(frozen=True)
class Item:
    id: str
    positive: Segment
    negative: Segment
    prefix: Segment | None = None
    category: str | None = None
    meta: Mapping[str, Any] | None = None
    zerospeech: ZeroSpeechRef | None = None

    def to_json(self) -> dict[str, Any]:
        row: dict[str, Any] = {"id": self.id}
        if self.prefix is not None:
            row["prefix"] = self.prefix.to_json()
        row |= {"positive": self.positive.to_json(), "negative": self.negative.to_json()}
        if self.category is not None:
            row["category"] = self.category
        if self.meta:
            row["meta"] = dict(self.meta)
        if self.zerospeech is not None:
            row["zerospeech"] = self.zerospeech.to_json()
        return row


def _segment(value: Any, field: str, where: str) -> Segment:
    if not isinstance(value, Mapping) or len(value) != 1 or next(iter(value)) not in ("units", "text"):
        raise BenchmarkError(f'{where}: {field} must be {{"units": [int, ...]}} or {{"text": "..."}}, got {value!r}')
    if "text" in value:
        text = value["text"]
        if not isinstance(text, str):
            raise BenchmarkError(f"{where}: {field}.text must be a string, got {type(text).__name__}")
        if not text.strip():
            raise BenchmarkError(f"{where}: {field} is empty (text without any non-space character)")
        return Segment(text=text)
    units = value["units"]
    if not isinstance(units, list) or not all(isinstance(u, int) and not isinstance(u, bool) for u in units):
        raise BenchmarkError(f"{where}: {field}.units must be a list of integers")
    if not units:
        raise BenchmarkError(f"{where}: {field} is empty (no units)")
    if min(units) < 0:
        raise BenchmarkError(f"{where}: {field}.units has a negative unit id {min(units)}")
    return Segment(units=tuple(units))


def _zerospeech(value: Any, where: str, has_prefix: bool) -> ZeroSpeechRef:
    if not isinstance(value, Mapping) or not _ZEROSPEECH_KEYS <= set(value) <= _ZEROSPEECH_KEYS | _ZEROSPEECH_OPTIONAL:
        raise BenchmarkError(
            f"{where}: zerospeech must have the keys {sorted(_ZEROSPEECH_KEYS)} and optionally "
            f"{sorted(_ZEROSPEECH_OPTIONAL)}"
        )
    groups = value.get("groups") or {}
    if not isinstance(groups, Mapping) or not all(isinstance(v, str) for v in groups.values()):
        raise BenchmarkError(f"{where}: zerospeech.groups must map a breakdown name to a string, got {groups!r}")
    ref = ZeroSpeechRef(**{k: str(value[k]) for k in _ZEROSPEECH_KEYS}, groups=tuple(groups.items()))
    if ref.task not in ZEROSPEECH_TASKS or ref.split not in ZEROSPEECH_SPLITS:
        raise BenchmarkError(
            f"{where}: zerospeech.task must be one of {ZEROSPEECH_TASKS} and split one of {ZEROSPEECH_SPLITS}, "
            f"got {ref.task!r}, {ref.split!r}"
        )
    if has_prefix:
        raise BenchmarkError(f"{where}: a ZeroSpeech item scores whole files, it cannot have a prefix")
    return ref


def parse_item(row: Any, where: str) -> Item:
    """One item from its JSON object; `where` (file:line) locates errors."""
    if not isinstance(row, Mapping):
        raise BenchmarkError(f"{where}: expected a JSON object, got {type(row).__name__}")
    item_id = row.get("id")
    if isinstance(item_id, bool) or not isinstance(item_id, (str, int)) or str(item_id) == "":
        raise BenchmarkError(f"{where}: missing or empty 'id' (a string or an integer)")
    where = f"{where} (item {str(item_id)!r})"
    unknown = sorted(set(row) - _KEYS)
    if unknown:
        raise BenchmarkError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(_KEYS)}")
    for field in ("positive", "negative"):
        if field not in row:
            raise BenchmarkError(f"{where}: missing '{field}'")
    prefix = _segment(row["prefix"], "prefix", where) if row.get("prefix") is not None else None
    category = row.get("category")
    if category is not None and not isinstance(category, str):
        raise BenchmarkError(f"{where}: category must be a string or null, got {category!r}")
    meta = row.get("meta")
    if meta is not None and not isinstance(meta, Mapping):
        raise BenchmarkError(f"{where}: meta must be an object")
    zerospeech = row.get("zerospeech")
    return Item(
        id=str(item_id),
        positive=_segment(row["positive"], "positive", where),
        negative=_segment(row["negative"], "negative", where),
        prefix=prefix,
        category=category,
        meta=meta,
        zerospeech=_zerospeech(zerospeech, where, prefix is not None) if zerospeech is not None else None,
    )


def read_items(path: str | Path) -> list[Item]:
    """Every item of a benchmark file, in file order; refuses duplicate ids and an empty file."""
    path = Path(path)
    if not path.is_file():
        raise BenchmarkError(f"benchmark file {path} not found")
    items: list[Item] = []
    first_line: dict[str, int] = {}
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise BenchmarkError(f"{where}: not valid JSON ({err})") from None
            item = parse_item(row, where)
            if item.id in first_line:
                raise BenchmarkError(f"{where}: duplicate id {item.id!r} (first on line {first_line[item.id]})")
            first_line[item.id] = number
            items.append(item)
    if not items:
        raise BenchmarkError(f"benchmark file {path} has no items")
    return items


def check_units(items: Iterable[Item], n_dsus: int, source: str) -> None:
    """Every unit id must be a DSU of the model: [0, n_dsus) from its ssi.json."""
    for item in items:
        for field in ("prefix", "positive", "negative"):
            segment = getattr(item, field)
            if segment is None or segment.units is None:
                continue
            worst = max(segment.units)
            if worst >= n_dsus:
                position = segment.units.index(worst)
                raise BenchmarkError(
                    f"{source}: item {item.id!r}: {field}.units[{position}] = {worst} is outside the model's "
                    f"{n_dsus} DSUs [0, {n_dsus}) (n_dsus from ssi.json): encoded with another unit inventory?"
                )


def write_items(path: str | Path, items: Iterable[Item], overwrite: bool = False) -> int:
    """Write items atomically (ids must be unique); returns how many."""
    seen: set[str] = set()
    lines = []
    for item in items:
        if item.id in seen:
            raise BenchmarkError(f"{path}: duplicate id {item.id!r}")
        seen.add(item.id)
        lines.append(json.dumps(item.to_json(), ensure_ascii=False))
    if not lines:
        raise BenchmarkError(f"{path}: no items to write")
    atomic_write_text(Path(path), "\n".join(lines) + "\n", overwrite=overwrite)
    return len(lines)
