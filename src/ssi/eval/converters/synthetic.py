"""A benchmark from the synthetic corpus (`ssi.data.synthetic`): real speech continuations against
corrupted ones, for tests and `make demo`.

The negative is the positive with its runs of repeated units shuffled (no two equal runs left adjacent):
the same units, run lengths and length, so a model that has not learnt the corpus's words is at chance,
including an untrained model with tied embeddings, which favours repeated units. Half the items continue
a speech prefix (the first half of the words), half score a whole utterance.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from ssi.data.cpt import speech_span
from ssi.eval.items import BenchmarkError, Item, Segment

MAX_SHUFFLES = 50


def runs(units: np.ndarray) -> list[np.ndarray]:
    """The units split into runs of one repeated value."""
    cuts = np.flatnonzero(units[1:] != units[:-1]) + 1
    return np.split(units, cuts)


def shuffle_runs(units: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
    """The runs in another order with no equal neighbours; None if no such order turned up."""
    pieces = runs(units)
    for _ in range(MAX_SHUFFLES):
        order = rng.permutation(len(pieces))
        shuffled = [pieces[i] for i in order]
        if any(a[0] == b[0] for a, b in itertools.pairwise(shuffled)):
            continue
        out = np.concatenate(shuffled)
        if not np.array_equal(out, units):
            return out
    return None


def shuffle_words(
    units: np.ndarray, spans: list[tuple[int, int]], rng: np.random.Generator, before: int | None = None
) -> np.ndarray | None:
    """`units` with the runs inside each word span shuffled (pauses between words stay where they are);
    `before` is the unit preceding `units` (a prefix's last). None if no word could be changed."""
    out = units.copy()
    changed = False
    for lo, hi in spans:
        shuffled = shuffle_runs(units[lo:hi], rng)
        if shuffled is None:
            continue
        # each edge of the word joins its neighbour's run exactly when the original did, so deduplication
        # leaves both candidates as many tokens
        left_now, left_then = (out[lo - 1], units[lo - 1]) if lo > 0 else (before, before)
        right = units[hi] if hi < units.size else None
        same_left = (shuffled[0] == left_now) == (units[lo] == left_then)
        same_right = (shuffled[-1] == right) == (units[hi - 1] == right)
        if same_left and same_right:
            out[lo:hi] = shuffled
            changed = True
    return out if changed else None


def synthetic_items(corpus: Path, split: str, n_items: int | None, seed: int) -> list[Item]:
    corpus = Path(corpus)
    meta_path, data_path = corpus / "synthetic.json", corpus / f"{split}.parquet"
    if not meta_path.is_file() or not data_path.is_file():
        raise BenchmarkError(f"{corpus}: not a synthetic corpus (needs synthetic.json and {split}.parquet)")
    fps = float(json.loads(meta_path.read_text())["fps"])
    rng = np.random.default_rng(seed)
    items = []
    for row in pq.read_table(data_path).to_pylist():
        if n_items is not None and len(items) >= n_items:
            break
        speech = np.asarray(row["speech_tokens"], dtype=np.int64)
        n_words = len(row["tokenized"])
        starts, ends = np.asarray(row["aligned_token_start_time"]), np.asarray(row["aligned_token_end_time"])
        spans = [speech_span(starts, ends, w, w + 1, fps, speech.size) for w in range(n_words)]
        first = n_words // 2 if len(items) % 2 == 0 and n_words >= 2 else 0
        cut = spans[first - 1][1] if first else 0
        continuation = speech[cut:]
        before = int(speech[cut - 1]) if cut else None
        negative = shuffle_words(continuation, [(lo - cut, hi - cut) for lo, hi in spans[first:]], rng, before)
        if negative is None:
            continue
        items.append(
            Item(
                id=str(row["ID"]),
                prefix=Segment(units=tuple(speech[:cut].tolist())) if cut else None,
                positive=Segment(units=tuple(continuation.tolist())),
                negative=Segment(units=tuple(negative.tolist())),
                category="continuation" if cut else "whole utterance",
            )
        )
    if not items:
        raise BenchmarkError(f"{data_path}: no utterance could be made into an item")
    return items
