"""StoryCloze as items: the spoken sets of slp-rl (sSC, tSC) from their audio's units, and the text set
(Spring 2016 or the xstory_cloze English split), so the same stories can be scored in every modality.

Spoken layouts (docs/evaluation.md, "Converters"; the zips' naming is not documented by their authors):

- `pairs`: a flat folder of whole stories `<integer>_<anything>.wav`. Sorted by the integer, consecutive
  files form a pair and the lower integer is the true ending (how slamkit reads sSC/tSC). A repeated
  integer, an odd number of files or a name without an integer makes the pairing ambiguous: refused.
- `triplets`: `<base>_mutual`, `<base>_correct`, `<base>_incorrect`, each as `.wav` and/or `.txt` (slamkit's
  cross-modal layout): prefix = mutual, positive = correct, negative = incorrect, in the modality asked for.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ssi.eval.converters.rows import hub_rows, local_files, need_columns, read_file
from ssi.eval.converters.units import UnitsTable
from ssi.eval.items import SPEECH, TEXT, BenchmarkError, Item, Segment

LAYOUTS = ("pairs", "triplets")
TRIPLET_PARTS = ("mutual", "correct", "incorrect")
_LEADING_INTEGER = re.compile(r"^(\d+)_")
# Column names of the two published text forms: the Hugging Face datasets and the ROCStories csv files.
_TEXT_COLUMNS = {
    "hf": ("story_id", ("input_sentence_1", "input_sentence_2", "input_sentence_3", "input_sentence_4"),
           ("sentence_quiz1", "sentence_quiz2"), "answer_right_ending"),
    "csv": ("InputStoryid", ("InputSentence1", "InputSentence2", "InputSentence3", "InputSentence4"),
            ("RandomFifthSentenceQuiz1", "RandomFifthSentenceQuiz2"), "AnswerRightEnding"),
}  # fmt: skip


def _speech(table: UnitsTable, relative: str) -> Segment:
    units = table.lookup(relative)
    if not units:
        raise BenchmarkError(f"units table {table.source}: {relative!r} has no units")
    return Segment(units=tuple(units))


def spoken_pairs(root: Path, table: UnitsTable) -> list[Item]:
    wavs = sorted(p.name for p in Path(root).glob("*.wav"))
    if not wavs:
        raise BenchmarkError(f"{root}: no .wav files (layout=pairs expects a flat folder of stories)")
    numbered: dict[int, str] = {}
    for name in wavs:
        match = _LEADING_INTEGER.match(name)
        if match is None:
            raise BenchmarkError(f"{root}/{name}: layout=pairs needs names '<integer>_...wav' to pair files")
        number = int(match.group(1))
        if number in numbered:
            raise BenchmarkError(
                f"{root}: {numbered[number]!r} and {name!r} share the number {number}: which one is the true ending is "
                "ambiguous under layout=pairs"
            )
        numbered[number] = name
    if len(numbered) % 2:
        raise BenchmarkError(f"{root}: {len(numbered)} files, an odd number, cannot form (true, false) pairs")
    ordered = [numbered[n] for n in sorted(numbered)]
    items = []
    for good, bad in zip(ordered[::2], ordered[1::2], strict=True):
        items.append(Item(id=Path(good).stem, positive=_speech(table, good), negative=_speech(table, bad)))
    return items


def spoken_triplets(root: Path, table: UnitsTable | None, prefix: str, continuation: str) -> list[Item]:
    root = Path(root)
    files = {p.name for p in root.iterdir() if p.suffix in (".wav", ".txt")}
    bases = sorted({name.rsplit("_", 1)[0] for name in files if name.rsplit(".", 1)[0].endswith("_correct")})
    if not bases:
        raise BenchmarkError(f"{root}: no '<base>_correct.wav|.txt' files (layout=triplets)")
    for name in sorted(files):
        base, _, part = name.rsplit(".", 1)[0].rpartition("_")
        if part not in TRIPLET_PARTS or base not in bases:
            raise BenchmarkError(f"{root}/{name}: not part of a '<base>_mutual|_correct|_incorrect' triplet")
    needed = {"mutual": prefix, "correct": continuation, "incorrect": continuation}
    items = []
    for base in bases:
        parts = {}
        for part, modality in needed.items():
            suffix = ".wav" if modality == SPEECH else ".txt"
            name = f"{base}_{part}{suffix}"
            if name not in files:
                raise BenchmarkError(f"{root}: {name} is missing (story {base!r}, {part} as {modality})")
            if modality == SPEECH:
                if table is None:
                    raise BenchmarkError("speech parts need --units (the units of the wav files)")
                parts[part] = _speech(table, name)
            else:
                parts[part] = Segment(text=(root / name).read_text(encoding="utf-8").strip())
        items.append(
            Item(
                id=base,
                prefix=parts["mutual"],
                positive=parts["correct"],
                negative=parts["incorrect"],
                category=f"{prefix}->{continuation}",
            )
        )
    return items


def _text_layout(row: dict[str, Any], where: str) -> tuple[str, tuple[str, ...], tuple[str, str], str]:
    for layout in _TEXT_COLUMNS.values():
        if layout[0] in row:
            need_columns(row, (layout[0], *layout[1], *layout[2], layout[3]), where)
            return layout
    raise BenchmarkError(
        f"{where}: not a StoryCloze table (no story_id or InputStoryid column); columns: {sorted(row)}"
    )


def text_items(source: str, split: str, config: str | None, revision: str | None) -> list[Item]:
    files = local_files(source)
    rows = [r for f in files for r in read_file(f)] if files else hub_rows(source, config, split, revision)
    if not rows:
        raise BenchmarkError(f"{source}: no rows")
    story, context, endings, answer = _text_layout(rows[0], source)
    items = []
    for number, row in enumerate(rows):
        right = int(row[answer])
        if right not in (1, 2):
            raise BenchmarkError(f"{source}: story {row[story]!r} (row {number}): {answer} must be 1 or 2, got {right}")
        items.append(
            Item(
                id=str(row[story]),
                prefix=Segment(text=" ".join(str(row[c]).strip() for c in context)),
                positive=Segment(text=str(row[endings[right - 1]])),
                negative=Segment(text=str(row[endings[2 - right]])),
            )
        )
    return items


__all__ = ["LAYOUTS", "SPEECH", "TEXT", "spoken_pairs", "spoken_triplets", "text_items"]
