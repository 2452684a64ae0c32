"""From per-item log-probabilities to what a benchmark reports: `scores.jsonl`, `summary.json` and the
ZeroSpeech 2021 submission files (docs/evaluation.md, "Outputs").

An item is correct when the positive candidate scores higher than the negative, half correct on a tie
(the ZeroSpeech and SALMon convention); accuracy is the mean over items, overall and per category. Items
converted from ZeroSpeech also get the official aggregates (the mean over pairs of the mean over voices, and
the same per frequency band, word length or sentence type), which are what a paper's table quotes.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ssi.eval.items import BenchmarkError, Item, ZeroSpeechRef

SCORES = ("sum", "mean")


@dataclass(frozen=True)
class ItemScore:
    item: Item
    positive: float
    negative: float
    n_positive_tokens: int
    n_negative_tokens: int

    @property
    def correct(self) -> float:
        """1 if the positive scores higher, 0.5 on a tie, 0 otherwise."""
        return 1.0 if self.positive > self.negative else 0.5 if self.positive == self.negative else 0.0


def reduce_score(total: float, count: int, score: str) -> float:
    """`sum` (the ZeroSpeech convention) or `mean` per scored token (slamkit's and SALMon's default)."""
    if score not in SCORES:
        raise BenchmarkError(f"score must be one of {SCORES}, got {score!r}")
    return total if score == "sum" else total / count


def item_scores(
    items: Sequence[Item], totals: Sequence[tuple[tuple[float, int], tuple[float, int]]], score: str
) -> list[ItemScore]:
    scored = []
    for item, ((pos, n_pos), (neg, n_neg)) in zip(items, totals, strict=True):
        values = reduce_score(pos, n_pos, score), reduce_score(neg, n_neg, score)
        if not all(math.isfinite(v) for v in values):
            raise BenchmarkError(f"item {item.id!r}: non-finite log-probability {values} (overflow in low precision?)")
        scored.append(ItemScore(item, *values, n_pos, n_neg))
    return scored


def scores_jsonl(scores: Sequence[ItemScore]) -> str:
    lines = []
    for s in scores:
        row: dict[str, Any] = {
            "id": s.item.id,
            "category": s.item.category,
            "positive": s.positive,
            "negative": s.negative,
            "correct": s.correct,
            "n_positive_tokens": s.n_positive_tokens,
            "n_negative_tokens": s.n_negative_tokens,
        }
        if s.item.meta:
            row["meta"] = dict(s.item.meta)
        lines.append(json.dumps(row, ensure_ascii=False))
    return "\n".join(lines) + "\n"


def _accuracy(scores: Sequence[ItemScore]) -> dict[str, Any]:
    return {"accuracy": sum(s.correct for s in scores) / len(scores), "n": len(scores)}


def summarize(scores: Sequence[ItemScore]) -> dict[str, Any]:
    """`accuracy`, `n`, `ties`, per-category `{accuracy, n}` and, for ZeroSpeech items, the official aggregate."""
    by_category: dict[str, list[ItemScore]] = defaultdict(list)
    for s in scores:
        if s.item.category is not None:
            by_category[s.item.category].append(s)
    summary = {
        **_accuracy(scores),
        "ties": sum(s.correct == 0.5 for s in scores),
        "categories": {name: _accuracy(group) for name, group in sorted(by_category.items())},
    }
    zerospeech = [s for s in scores if s.item.zerospeech is not None]
    if zerospeech:
        summary["zerospeech"] = _zerospeech_aggregate(zerospeech)
    return summary


# The official breakdowns of each task, and the order their rows are listed in.
ZEROSPEECH_BREAKDOWNS = {"lexical": ("frequency", "length"), "syntactic": ("type",)}
_BAND_ORDER = ("oov", "1-5", "6-20", "21-100", ">100")
_BREAKDOWN_ORDER: dict[str, Callable[[str], Any]] = {
    "frequency": lambda band: _BAND_ORDER.index(band) if band in _BAND_ORDER else len(_BAND_ORDER),
    "length": lambda length: (0, int(length), "") if length.isdigit() else (1, 0, length),
    "type": str,
}


def _zerospeech_aggregate(scores: Sequence[ItemScore]) -> dict[str, Any]:
    """What the official scorer reports for each task/split: the pair score averaged over voices within a pair
    key (its `by_pair` table), then over pair keys (`accuracy`), and the same pair scores grouped by its
    breakdowns (`by_frequency` and `by_length` for lexical, `by_type` for syntactic: `{n, score, std}` each)
    with lexical `in_vocab` (the bands but `oov`, weighted by their pair counts)."""
    groups: dict[tuple[str, str], dict[str, list[ItemScore]]] = defaultdict(lambda: defaultdict(list))
    for s in scores:
        ref = _ref(s)
        groups[(ref.task, ref.split)][ref.pair].append(s)
    out = {}
    for (task, split), pairs in sorted(groups.items()):
        # per pair key: mean over voices; its breakdowns are those of its first item, as the scorer takes them
        by_pair = [(_mean([s.correct for s in group]), dict(_ref(group[0]).groups)) for group in pairs.values()]
        aggregate: dict[str, Any] = {"accuracy": _mean([score for score, _ in by_pair]), "n_pairs": len(by_pair)}
        for breakdown in ZEROSPEECH_BREAKDOWNS[task]:
            bands: dict[str, list[float]] = defaultdict(list)
            for score, keys in by_pair:
                if breakdown in keys:
                    bands[keys[breakdown]].append(score)
            if bands:
                aggregate[f"by_{breakdown}"] = {
                    name: _spread(bands[name]) for name in sorted(bands, key=_BREAKDOWN_ORDER[breakdown])
                }
        if "by_frequency" in aggregate:
            in_vocab = [v for name, v in aggregate["by_frequency"].items() if name != "oov"]
            if in_vocab:
                total = sum(v["n"] for v in in_vocab)
                aggregate["in_vocab"] = sum(v["score"] * v["n"] for v in in_vocab) / total
        out[f"{task}/{split}"] = aggregate
    return out


def _ref(score: ItemScore) -> ZeroSpeechRef:
    assert score.item.zerospeech is not None
    return score.item.zerospeech


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _spread(values: Sequence[float]) -> dict[str, Any]:
    """`{n, score, std}` as the official tables give them: the sample standard deviation, none for one pair."""
    mean = _mean(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
    return {"n": len(values), "score": mean, "std": std}


def zerospeech_files(scores: Sequence[ItemScore]) -> dict[str, str]:
    """`{"lexical/dev.txt": "<wav stem> <score>\\n..."}`: one line per file, as `zerospeech2021-evaluate` reads
    them. A file scored in several items must get the same score in each (whole-file scores)."""
    by_file: dict[str, dict[str, float]] = defaultdict(dict)
    for s in scores:
        ref = s.item.zerospeech
        if ref is None:
            continue
        table = by_file[f"{ref.task}/{ref.split}.txt"]
        for stem, value in ((ref.positive, s.positive), (ref.negative, s.negative)):
            if " " in stem or not stem:
                raise BenchmarkError(f"item {s.item.id!r}: ZeroSpeech file name {stem!r} is empty or has a space")
            known = table.setdefault(stem, value)
            if abs(known - value) > 1e-4 * max(1.0, abs(value)):
                raise BenchmarkError(
                    f"item {s.item.id!r}: file {stem!r} scored {value} here but {known} in another item; "
                    "the same units must be scored identically"
                )
    return {name: "".join(f"{stem} {value!r}\n" for stem, value in table.items()) for name, table in by_file.items()}


def format_summary(name: str, summary: dict[str, Any], score: str) -> str:
    lines = [f"{name}: accuracy {100 * summary['accuracy']:.2f}% over {summary['n']} items (score={score})"]
    for category, values in summary["categories"].items():
        lines.append(f"  {category:<32} {100 * values['accuracy']:6.2f}%  n={values['n']}")
    for task, values in summary.get("zerospeech", {}).items():
        lines.append(
            f"  ZeroSpeech {task}: {100 * values['accuracy']:.2f}% over {values['n_pairs']} pairs (voices averaged)"
            + (f", in-vocabulary {100 * values['in_vocab']:.2f}%" if "in_vocab" in values else "")
        )
        for breakdown in ZEROSPEECH_BREAKDOWNS.get(task.split("/")[0], ()):
            rows = values.get(f"by_{breakdown}", {})
            if rows:
                lines.append(
                    f"    by {breakdown}: "
                    + ", ".join(f"{k} {100 * v['score']:.2f}% (n={v['n']})" for k, v in rows.items())
                )
    return "\n".join(lines)
