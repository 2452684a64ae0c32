"""Floating-point dtypes as users and files spell them: `bf16` / `fp32` / `fp16` on command lines,
`bfloat16` / `float32` in config.json, `torch.bfloat16` in Python. One parser for all of them."""

from __future__ import annotations

from typing import Any

import torch

_NAMES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
}


class DtypeError(ValueError):
    """A dtype name that is not one of bf16, fp16, fp32 (in any of their spellings)."""


def parse_dtype(dtype: str | torch.dtype, what: str = "dtype") -> torch.dtype:
    """`bf16` / `fp32` / `fp16`, their long names, or a torch dtype; `what` names the setting in errors."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _NAMES.values():
            raise DtypeError(f"{what}: unsupported dtype {dtype} (expected bf16, fp16 or fp32)")
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _NAMES:
        raise DtypeError(f"{what}: unsupported dtype {dtype!r} (expected one of bf16, fp16, fp32)")
    return _NAMES[key]


def config_dtype(config: dict[str, Any], source: str = "config.json") -> torch.dtype:
    """The dtype a config.json declares: `torch_dtype` (the hub's files, transformers 4) or `dtype` (5)."""
    return parse_dtype(config.get("torch_dtype", config.get("dtype", "float32")), f"{source} torch_dtype")


def short_name(dtype: torch.dtype) -> str:
    """`bfloat16`, `float32`...: the spelling config.json and vLLM use."""
    return str(dtype).removeprefix("torch.")
