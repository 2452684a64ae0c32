"""torch tensors in and out of safetensors files, through hf_dir's streaming writer."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import torch

from ssi.hf_dir import write_safetensors

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype (`BF16`, `F32`...)."""
    return _DTYPE_NAMES[dtype]


def tensor_bytes_writer(tensors: list[torch.Tensor]) -> Callable[[int, BinaryIO], None]:
    """A `write_safetensors` callback for in-memory tensors."""

    def write(i: int, f: BinaryIO) -> None:
        f.write(tensors[i].contiguous().view(-1).view(torch.uint8).numpy().tobytes())

    return write


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write in-memory tensors as one safetensors file (small models, tests, fixtures)."""
    names = list(tensors)
    layout = [(n, dtype_name(tensors[n].dtype), tuple(tensors[n].shape)) for n in names]
    write_safetensors(path, layout, tensor_bytes_writer([tensors[n] for n in names]))
