"""HF model directories on disk: the files they hold, their config, and their weights as safetensors bytes.

Weights are handled tensor by tensor straight from the safetensors byte layout (an 8-byte header
length, a JSON header with dtype/shape/offsets, then raw bytes), so a 3B checkpoint can be edited
without ever holding it in memory. This module owns the names of a model directory's files
(docs/vocabulary.md lists what a speech-extended one holds).
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from ssi.files import FileFormatError, read_json

SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
TIKTOKEN_FILE = "original/tokenizer.model"
MANIFEST_NAME = "ssi.json"  # the speech-vocabulary manifest of an extended model (ssi.vocab.layout)
# What a complete speech-extended model directory holds besides weights: transformers, vLLM and torchtune
# each need some of these, and every checkpoint carries them all.
REQUIRED_SIDE_FILES = ("config.json", "generation_config.json", *TOKENIZER_FILES, TIKTOKEN_FILE, MANIFEST_NAME)
_COPY_CHUNK = 64 << 20

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


class ModelDirError(ValueError):
    """A model directory that is missing files or is not what a tool expects."""


# --- config ----------------------------------------------------------------------------------------


def read_model_json(path: Path) -> dict[str, Any]:
    """A JSON file of a model directory; a missing or broken one is a `ModelDirError` naming it."""
    try:
        return read_json(path)
    except FileFormatError as err:
        raise ModelDirError(str(err)) from None


def read_llama_config(model_dir: Path) -> dict[str, Any]:
    """config.json of an HF Llama directory; anything else is refused with the reason."""
    if not model_dir.is_dir():
        raise ModelDirError(f"{model_dir} is not a directory")
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ModelDirError(f"{model_dir} is not an HF model directory: config.json is missing")
    config = read_model_json(config_path)
    if config.get("model_type") != "llama":
        raise ModelDirError(
            f"{config_path}: model_type is {config.get('model_type')!r}, expected 'llama' (a Llama 3.x checkpoint)"
        )
    return config


def missing_files(model_dir: Path) -> list[str]:
    """What a directory lacks to be a complete speech-extended model or checkpoint (empty: complete)."""
    missing = [f for f in REQUIRED_SIDE_FILES if not (model_dir / f).is_file()]
    if not (model_dir / SAFETENSORS_SINGLE).is_file() and not (model_dir / SAFETENSORS_INDEX).is_file():
        missing.append(f"{SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX}")
    return missing


def config_rope_scaling(config: dict[str, Any]) -> dict[str, Any] | None:
    """Rope scaling from `rope_scaling` (the hub's config.json) or `rope_parameters` (transformers 5)."""
    return config.get("rope_scaling") or config.get("rope_parameters")


# --- safetensors -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes live inside a safetensors file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def torch_dtype(self) -> torch.dtype:
        return SAFETENSORS_DTYPES[self.dtype]


def read_safetensors_header(path: Path) -> tuple[list[TensorEntry], dict[str, str]]:
    """Tensor entries (in file order) and `__metadata__` of a safetensors file, without reading data."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ModelDirError(f"{path} is not a safetensors file (shorter than 8 bytes)")
        (header_len,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ModelDirError(f"{path} is not a safetensors file (unreadable header)") from None
    metadata = header.pop("__metadata__", {}) or {}
    base = 8 + header_len
    entries = [
        TensorEntry(
            name,
            info["dtype"],
            tuple(info["shape"]),
            base + info["data_offsets"][0],
            base + info["data_offsets"][1],
        )
        for name, info in header.items()
    ]
    return sorted(entries, key=lambda e: e.start), metadata


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a model directory (one file, or the shards named by the index)."""
    index_path = model_dir / SAFETENSORS_INDEX
    if index_path.is_file():
        shards = sorted(set(read_model_json(index_path).get("weight_map", {}).values()))
        if not shards:
            raise ModelDirError(f"{index_path} has an empty weight_map")
        missing = [s for s in shards if not (model_dir / s).is_file()]
        if missing:
            raise ModelDirError(f"{index_path} names shards that are missing: {missing}")
        return [model_dir / s for s in shards]
    if (model_dir / SAFETENSORS_SINGLE).is_file():
        return [model_dir / SAFETENSORS_SINGLE]
    raise ModelDirError(f"{model_dir} has no weights: neither {SAFETENSORS_SINGLE} nor {SAFETENSORS_INDEX}")


def read_tensor_rows(f: BinaryIO, entry: TensorEntry, row_start: int, row_end: int) -> torch.Tensor:
    """Rows [row_start, row_end) of a 2-D tensor, read from an open file without touching the rest."""
    row_bytes = entry.nbytes // entry.shape[0]
    f.seek(entry.start + row_start * row_bytes)
    buf = bytearray((row_end - row_start) * row_bytes)
    f.readinto(buf)
    return torch.frombuffer(buf, dtype=entry.torch_dtype).view(row_end - row_start, *entry.shape[1:])


def copy_byte_range(src: BinaryIO, dst: BinaryIO, start: int, length: int) -> None:
    """Copy bytes [start, start+length) of `src` to the current position of `dst`, kernel-side when possible."""
    dst.flush()
    src_fd, dst_fd = src.fileno(), dst.fileno()
    offset, remaining = start, length
    with contextlib.suppress(AttributeError, OSError):
        while remaining:
            n = os.copy_file_range(src_fd, dst_fd, min(remaining, 1 << 30), offset)
            if n == 0:
                break
            offset, remaining = offset + n, remaining - n
    dst.seek(0, os.SEEK_END)  # resync the buffered writer with the fd the kernel advanced
    src.seek(offset)
    while remaining:
        chunk = src.read(min(remaining, _COPY_CHUNK))
        if not chunk:
            raise ModelDirError(f"{getattr(src, 'name', 'input')} ended early: truncated safetensors file")
        dst.write(chunk)
        remaining -= len(chunk)


def write_safetensors(
    path: Path,
    layout: list[tuple[str, str, tuple[int, ...]]],
    write_tensor: Callable[[int, BinaryIO], None],
    metadata: dict[str, str] | None = None,
) -> int:
    """Stream a safetensors file: `layout` lists (name, dtype, shape) in data order and
    `write_tensor(i, f)` writes exactly the bytes of tensor i. Returns the data size in bytes."""
    header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    sizes = []
    for name, dtype, shape in layout:
        nbytes = SAFETENSORS_DTYPES[dtype].itemsize * int(torch.Size(shape).numel())
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        sizes.append(nbytes)
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for i, nbytes in enumerate(sizes):
            before = f.tell()
            write_tensor(i, f)
            if f.tell() - before != nbytes:
                raise RuntimeError(f"{path}: tensor {layout[i][0]} wrote {f.tell() - before} bytes, expected {nbytes}")
    return offset


def tensor_bytes_writer(tensors: list[torch.Tensor]) -> Callable[[int, BinaryIO], None]:
    """A `write_safetensors` callback for in-memory tensors."""

    def write(i: int, f: BinaryIO) -> None:
        f.write(tensors[i].contiguous().view(-1).view(torch.uint8).numpy().tobytes())

    return write


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write in-memory tensors as one safetensors file (small models, tests, fixtures)."""
    names = list(tensors)
    layout = [(n, _DTYPE_NAMES[tensors[n].dtype], tuple(tensors[n].shape)) for n in names]
    write_safetensors(path, layout, tensor_bytes_writer([tensors[n] for n in names]))


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES[dtype]
