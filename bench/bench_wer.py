#!/usr/bin/env python
"""WER scoring time of `ssi.eval` vs Hugging Face `evaluate`'s "wer" metric on the same utterances.

    python bench/bench_wer.py [--n 100000] [--reference auto|evaluate|reimplementation]

The evaluate metric is a hub script (`evaluate.load("wer")` fetches evaluate-metric/wer); the PyPI
package does not ship it, so offline or without `evaluate` installed the bench times a labelled
re-implementation of what that script computes with jiwer 4 and concatenate_texts=False (its
default): one `jiwer.process_words(reference, prediction)` per pair, WER = sum(S+D+I) / sum(S+D+H).
The real metric also copies the inputs into an Arrow cache first, so the re-implementation is the
faster of the two: the ratio against it understates our lead. Neither side normalises in the
head-to-head (evaluate does not); normalisation and the whole CLI path are timed separately.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import jiwer

from ssi.eval.scoring import score_generations
from ssi.eval.wer import compute_wer, default_workers

# English-like text with what normalisers act on: abbreviations, contractions, numbers, British spelling.
_VOCABULARY = """
the of and to in a is that for it as was with be by on not he this are or his from at which but have an had
they you were their one all we can her has there been if more when will would who so no mister doctor colour
behaviour centre organise twenty thirty hundred first second Mr. Dr. St. don't it's we'll 1990 21st $5 3.5
OK, Yes! Well,
"""
_TOKENS = _VOCABULARY.split()
T = TypeVar("T")


def synthetic_corpus(n: int, seed: int) -> tuple[list[str], list[str], list[str]]:
    """ids, references, hypotheses: 5-40-word references with ~12% substitutions, deletions and insertions."""
    rng = random.Random(seed)
    ids, refs, hyps = [], [], []
    for i in range(n):
        ref = rng.choices(_TOKENS, k=rng.randint(5, 40))
        hyp = []
        for word in ref:
            roll = rng.random()
            if roll < 0.06:
                hyp.append(rng.choice(_TOKENS))
            elif roll < 0.09:
                continue
            else:
                hyp.append(word.upper() if rng.random() < 0.02 else word)
            if rng.random() < 0.03:
                hyp.append(rng.choice(_TOKENS))
        ids.append(f"utt{i:07d}")
        refs.append(" ".join(ref))
        hyps.append(" ".join(hyp) if rng.random() > 0.05 else " ".join(ref))
    return ids, refs, hyps


def evaluate_reimplementation(predictions: list[str], references: list[str]) -> float:
    """What evaluate-metric/wer computes with jiwer >= 4 and concatenate_texts=False: per-pair jiwer calls."""
    incorrect = total = 0
    for prediction, reference in zip(predictions, references, strict=True):
        out = jiwer.process_words(reference, prediction)
        incorrect += out.substitutions + out.deletions + out.insertions
        total += out.substitutions + out.deletions + out.hits
    return incorrect / total


def load_reference(choice: str) -> tuple[str, Callable[[list[str], list[str]], float]]:
    """The real evaluate metric when it loads (and was asked for or allowed), else the re-implementation."""
    if choice in ("auto", "evaluate"):
        try:
            import evaluate

            metric = evaluate.load("wer")
        except Exception as err:  # ImportError, or the hub script is unreachable (offline: FileNotFoundError)
            if choice == "evaluate":
                raise SystemExit(f"cannot load evaluate's 'wer' metric: {type(err).__name__}: {err}") from err
            print(f"evaluate's 'wer' metric is not loadable here ({type(err).__name__}: {str(err)[:120]})")
        else:
            return "evaluate.load('wer') (real hub metric)", lambda p, r: metric.compute(predictions=p, references=r)
    label = (
        "re-implementation of evaluate-metric/wer (per-pair jiwer.process_words; the real metric also copies "
        "the inputs into an Arrow cache, so this is a lower bound on its time)"
    )
    return label, evaluate_reimplementation


def timed(fn: Callable[[], T]) -> tuple[float, T]:
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000, help="utterances (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2, help="best of this many interleaved runs in the head-to-head")
    parser.add_argument("--reference", choices=("auto", "evaluate", "reimplementation"), default="auto")
    parser.add_argument("--skip-normalizer", action="store_true", help="skip the whisper-normaliser timings")
    args = parser.parse_args()

    ids, refs, hyps = synthetic_corpus(args.n, args.seed)
    n_words = sum(len(r.split()) for r in refs)
    print(f"{args.n} synthetic utterances, {n_words} reference words")
    label, reference = load_reference(args.reference)

    # Interleaved, best of each: on a shared machine both sides then see the same background load.
    t_ref = t_ours = float("inf")
    for _ in range(args.repeats):
        t, ref_wer = timed(lambda: reference(hyps, refs))
        t_ref = min(t_ref, t)
        t, ours = timed(lambda: compute_wer(ids, refs, hyps, normalizer="none", progress=False))
        t_ours = min(t_ours, t)
    if abs(ours.wer - ref_wer) > 1e-12:
        print(f"MISMATCH: ssi WER {ours.wer!r} vs reference {ref_wer!r}")
        return 1
    print(f"reference: {label}")
    print(f"  reference          {t_ref:7.2f} s   WER {100 * ref_wer:.4f}%")
    print(f"  ssi.compute_wer    {t_ours:7.2f} s   WER {100 * ours.wer:.4f}%   (normalizer=none, identical WER)")
    print(f"  speed-up vs reference: {t_ref / t_ours:.2f}x (>= 1 means not slower)")

    if not args.skip_normalizer:
        workers = default_workers()
        t_w1, _ = timed(lambda: compute_wer(ids, refs, hyps, workers=1, progress=False))
        print(f"  whisper normaliser + scoring, 1 process:     {t_w1:7.2f} s ({args.n / t_w1:,.0f} utterances/s)")
        if workers > 1:
            t_wn, _ = timed(lambda: compute_wer(ids, refs, hyps, workers=workers, progress=False))
            print(
                f"  whisper normaliser + scoring, {workers} processes:   {t_wn:7.2f} s "
                f"({args.n / t_wn:,.0f} utterances/s, {t_w1 / t_wn:.2f}x the 1-process run)"
            )
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "generations.jsonl"
            with open(path, "w", encoding="utf-8") as f:
                for uid, ref, hyp in zip(ids, refs, hyps, strict=True):
                    f.write(json.dumps({"id": uid, "reference": ref, "text": hyp}) + "\n")
            t_cli, summary = timed(lambda: score_generations(path, overwrite=True, progress=False))
            print(
                f"  score_generations (read jsonl, whisper, write wer.json): {t_cli:7.2f} s, "
                f"WER {100 * summary['wer']:.2f}%"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
