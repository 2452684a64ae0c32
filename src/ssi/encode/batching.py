"""Length-sorted batches bounded by padded audio size, padding only what encodes exactly when padded.

Longest first, so each batch's rows are close in length and little compute goes to padding. A batch's
padded size (rows x its longest utterance) stays within the budget; an utterance longer than the budget
gets a batch of its own. A shorter utterance joins a batch only if it has the batch's length or the
encoder says padding leaves its units unchanged (`UnitEncoder.padding_exact`), which is what makes a
batched run give the units of encoding every utterance alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np

T = TypeVar("T")


def plan_batches(
    lengths: Sequence[int], max_samples: int, max_rows: int, padding_exact: Callable[[int], bool]
) -> list[list[int]]:
    """Indices into `lengths`, grouped into batches (longest first; ties in index order)."""
    if max_samples < 1 or max_rows < 1:
        raise ValueError(f"batch limits must be positive, got max_samples={max_samples}, max_rows={max_rows}")
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[index]
        joins = (
            current
            and len(current) < max_rows
            and (len(current) + 1) * longest <= max_samples
            and (n == longest or padding_exact(n))
        )
        if joins:
            current.append(index)
            continue
        if current:
            batches.append(current)
        current, longest = [index], n
    if current:
        batches.append(current)
    return batches


def run_batched(
    waves: Sequence[np.ndarray],
    fn: Callable[[list[np.ndarray]], list[T]],
    max_samples: int,
    max_rows: int,
    padding_exact: Callable[[int], bool],
) -> list[T]:
    """`fn` over planned batches of `waves`; one result per wave, in the order of `waves`."""
    results: list[T | None] = [None] * len(waves)
    for batch in plan_batches([len(w) for w in waves], max_samples, max_rows, padding_exact):
        for index, result in zip(batch, fn([waves[i] for i in batch]), strict=True):
            results[index] = result
    return results  # type: ignore[return-value]
