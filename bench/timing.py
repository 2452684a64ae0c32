"""Shared by the benchmarks: time a piece of work the way a shared machine allows."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def best_of(repeats: int, work: Callable[[], T]) -> tuple[float, T]:
    """The shortest of `repeats` timings (background load on a shared machine only ever adds time), with the
    last run's result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = work()
        best = min(best, time.perf_counter() - t0)
    assert result is not None or repeats > 0
    return best, result  # type: ignore[return-value]
