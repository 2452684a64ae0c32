"""SALMon (slp-rl) as items: one folder per task, `sample_<index>_<k>.wav` with k = 0 the positive and
k = 1 the negative (the benchmark's own generation scripts write them so); the task is the category."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from ssi.eval.converters.units import UnitsTable
from ssi.eval.items import BenchmarkError, Item, Segment

TASKS = (
    "bg_alignment",
    "bg_all_consistency",
    "bg_domain_consistency",
    "gender_consistency",
    "rir_consistency",
    "sentiment_alignment",
    "sentiment_consistency",
    "speaker_consistency",
)
_SAMPLE = re.compile(r"^sample_(\d+)_([01])\.wav$")


def salmon_items(root: Path, units: str, tasks: list[str] | None) -> list[Item]:
    """`units` is one table keyed by `<task>/sample_<i>_<k>` (or by stems, if unique), or a pattern with
    `{task}` naming one table per task (e.g. one `scripts/encode_audio.py` output per task folder)."""
    root = Path(root)
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    chosen = tasks or [t for t in found if any((root / t).glob("sample_*.wav"))]
    if not chosen:
        raise BenchmarkError(f"{root}: no task folder with sample_<i>_<k>.wav files (expected e.g. {TASKS[:2]})")
    shared = None if "{task}" in units else UnitsTable(units)
    stems = Counter(p.stem for t in chosen for p in (root / t).glob("*.wav"))
    # one table for every task: a stem-only key cannot say which task's file it is
    ambiguous = {stem for stem, n in stems.items() if n > 1} if shared is not None else set()
    items = []
    for task in chosen:
        folder = root / task
        if not folder.is_dir():
            raise BenchmarkError(f"{folder}: no such task folder; found {found}")
        table = shared or UnitsTable(units.replace("{task}", task))
        samples: dict[int, dict[int, str]] = {}
        for wav in sorted(folder.glob("*.wav")):
            match = _SAMPLE.match(wav.name)
            if match is None:
                raise BenchmarkError(f"{wav}: not named sample_<index>_<0|1>.wav (0 = positive, 1 = negative)")
            samples.setdefault(int(match.group(1)), {})[int(match.group(2))] = wav.name
        for index, pair in sorted(samples.items()):
            if set(pair) != {0, 1}:
                raise BenchmarkError(f"{folder}: sample {index} has only {pair[min(pair)]} (needs _0 and _1)")
            segments = []
            for k in (0, 1):
                found_units = table.lookup(f"{task}/{pair[k]}", ambiguous)
                if not found_units:
                    raise BenchmarkError(f"units table {table.source}: {task}/{pair[k]} has no units")
                segments.append(Segment(units=tuple(found_units)))
            items.append(Item(id=f"{task}/sample_{index}", positive=segments[0], negative=segments[1], category=task))
    return items
