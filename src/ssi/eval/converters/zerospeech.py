"""ZeroSpeech 2021 lexical (sWUGGY) and syntactic (sBLIMP) sets as items, from their `gold.csv` and the units
of their wav files (docs/evaluation.md, "Converters").

`<dataset>/<task>/<split>/gold.csv` lists every file (`filename` = wav stem, `correct` 1 or 0). Pairs are
formed as the official scorers form them: lexical, every word with every non-word of the same (`id`,
`voice`) (one each in the published sets); syntactic, the k-th correct row with the k-th incorrect row in
file order, which must agree on `id`, `voice`, `type` and `subtype`. Each item scores whole files (no
prefix) and remembers both stems, so `scripts/evaluate.py` can write the submission files.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from ssi.eval.converters.units import UnitsTable
from ssi.eval.items import BenchmarkError, Item, Segment, ZeroSpeechRef

REQUIRED = {
    "lexical": {"filename", "id", "voice", "correct", "word", "phones", "frequency", "length"},
    "syntactic": {"filename", "id", "voice", "correct", "type", "subtype", "transcription"},
}
# The official by-frequency bands (occurrences in LibriSpeech), used as the lexical category. The scorer
# cuts at 0, 1, 5, 20, 100 with intervals closed on the left, so its labels are not its intervals: "1-5"
# holds 1..4, "6-20" holds 5..19, "21-100" holds 20..99 and ">100" holds 100 and more (docs/evaluation.md).
FREQUENCY_BANDS = ((0, 1, "oov"), (1, 5, "1-5"), (5, 20, "6-20"), (20, 100, "21-100"), (100, math.inf, ">100"))


def read_gold(path: Path, task: str) -> list[dict[str, str]]:
    if not path.is_file():
        raise BenchmarkError(f"{path} not found (expected <dataset>/{task}/<split>/gold.csv)")
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    missing = REQUIRED[task] - set(rows[0] if rows else {})
    if missing:
        raise BenchmarkError(f"{path}: missing column(s) {sorted(missing)} for the {task} task")
    for number, row in enumerate(rows, start=2):
        if row["correct"] not in ("0", "1"):
            raise BenchmarkError(f"{path}:{number}: correct must be 0 or 1, got {row['correct']!r}")
    seen: set[str] = set()
    for number, row in enumerate(rows, start=2):
        if row["filename"] in seen:
            raise BenchmarkError(f"{path}:{number}: duplicate filename {row['filename']!r}")
        seen.add(row["filename"])
    return rows


def frequency_band(frequency: str) -> str | None:
    """The official band of a word's frequency; None (in no band, as in the official scorer) when the gold
    file gives none or a negative one."""
    try:
        value = float(frequency)
    except ValueError:
        return None
    return next((name for lower, upper, name in FREQUENCY_BANDS if lower <= value < upper), None)


def _units(table: UnitsTable, stem: str) -> Segment:
    units = table.lookup(stem)
    if not units:
        raise BenchmarkError(f"units table {table.source}: {stem!r} has no units (audio too short to encode?)")
    return Segment(units=tuple(units))


def lexical_items(dataset: Path, split: str, table: UnitsTable) -> list[Item]:
    gold = Path(dataset) / "lexical" / split / "gold.csv"
    rows = read_gold(gold, "lexical")
    groups: dict[tuple[str, str], tuple[list[dict], list[dict]]] = {}
    for row in rows:
        words, non_words = groups.setdefault((row["id"], row["voice"]), ([], []))
        (words if row["correct"] == "1" else non_words).append(row)
    items = []
    for (pair_id, voice), (words, non_words) in groups.items():
        if not words or not non_words:
            lone = (words or non_words)[0]["filename"]
            raise BenchmarkError(f"{gold}: file {lone!r} (id {pair_id}, voice {voice}) has no partner to compare with")
        for word in words:
            for non_word in non_words:
                band = frequency_band(word["frequency"])
                groups = (("frequency", band),) if band is not None else ()
                ref = ZeroSpeechRef(
                    "lexical",
                    split,
                    word["filename"],
                    non_word["filename"],
                    pair_id,
                    (*groups, ("length", word["length"])),
                )
                items.append(
                    Item(
                        id=f"{word['filename']}>{non_word['filename']}",
                        positive=_units(table, word["filename"]),
                        negative=_units(table, non_word["filename"]),
                        category=band,
                        meta={
                            "id": pair_id,
                            "voice": voice,
                            "word": word["word"],
                            "non_word": non_word["word"] or non_word["phones"],
                            "frequency": word["frequency"],
                            "length": word["length"],
                        },
                        zerospeech=ref,
                    )
                )
    return items


def syntactic_items(dataset: Path, split: str, table: UnitsTable) -> list[Item]:
    gold = Path(dataset) / "syntactic" / split / "gold.csv"
    rows = read_gold(gold, "syntactic")
    correct = [(n, r) for n, r in enumerate(rows, start=2) if r["correct"] == "1"]
    incorrect = [(n, r) for n, r in enumerate(rows, start=2) if r["correct"] == "0"]
    if len(correct) != len(incorrect):
        raise BenchmarkError(
            f"{gold}: {len(correct)} correct and {len(incorrect)} incorrect rows; the scorer pairs them by position"
        )
    items = []
    for (n_good, good), (n_bad, bad) in zip(correct, incorrect, strict=True):
        keys = ("id", "voice", "type", "subtype")
        if any(good[k] != bad[k] for k in keys):
            raise BenchmarkError(
                f"{gold}: lines {n_good} and {n_bad} are paired by position (as the official scorer pairs them) "
                f"but differ in {[k for k in keys if good[k] != bad[k]]}"
            )
        pair = f"{good['type']}/{good['subtype']}/{good['id']}"
        items.append(
            Item(
                id=f"{good['filename']}>{bad['filename']}",
                positive=_units(table, good["filename"]),
                negative=_units(table, bad["filename"]),
                category=good["type"],
                meta={
                    "id": good["id"],
                    "voice": good["voice"],
                    "subtype": good["subtype"],
                    "sentence": good["transcription"],
                    "non_sentence": bad["transcription"],
                },
                zerospeech=ZeroSpeechRef(
                    "syntactic", split, good["filename"], bad["filename"], pair, (("type", good["type"]),)
                ),
            )
        )
    return items
