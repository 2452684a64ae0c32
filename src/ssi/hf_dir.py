"""HF model directories on disk: the files they hold, their config, and their weights as safetensors bytes.

Weights are handled tensor by tensor straight from the safetensors byte layout (an 8-byte header
length, a JSON header with dtype/shape/offsets, then raw bytes), so a 3B checkpoint can be edited
without ever holding it in memory. This module owns the names of a model directory's files
(docs/vocabulary.md lists what a speech-extended one holds). It needs numpy but not torch, so that the
extension command starts in a fraction of a second (ssi.model.tensor_files holds the torch side).
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

import numpy as np

from ssi.files import FileFormatError, read_json

SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
TIKTOKEN_FILE = "original/tokenizer.model"
MANIFEST_NAME = "ssi.json"  # the speech-vocabulary manifest of an extended model (ssi.vocab.layout)
INPUT_EMBEDDING = "model.embed_tokens.weight"  # the HF name of a Llama's input embedding matrix
METHOD_MANIFEST = "speech_method.json"  # a features-method checkpoint's manifest (ssi.model.methods.features)
# What a complete speech-extended model directory holds besides weights: transformers, vLLM and torchtune
# each need some of these, and every checkpoint carries them all.
REQUIRED_SIDE_FILES = ("config.json", "generation_config.json", *TOKENIZER_FILES, TIKTOKEN_FILE, MANIFEST_NAME)
_COPY_CHUNK = 64 << 20

# Bytes per element of each safetensors dtype.
SAFETENSORS_ITEMSIZE = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}
# Floating-point dtypes whose rows can be read as float32 and written back (`read_rows_f32`, `f32_to_bytes`).
FLOAT_DTYPES = ("F32", "F16", "BF16")


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
    """What a directory lacks to be a complete speech-extended model or checkpoint (empty: complete). A
    checkpoint of the features method may hold a base LLM: its speech_method.json stands for ssi.json."""
    missing = [f for f in REQUIRED_SIDE_FILES if not (model_dir / f).is_file()]
    if MANIFEST_NAME in missing and (model_dir / METHOD_MANIFEST).is_file():
        missing.remove(MANIFEST_NAME)
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


def read_tensor(model_dir: Path, name: str) -> Any:
    """One tensor of a model directory (a torch tensor, in its file dtype), wherever its shards keep it."""
    from safetensors import safe_open

    for path in weight_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            names = f.keys()
            if name in names:
                return f.get_tensor(name)
    raise ModelDirError(f"{model_dir}: no tensor {name} in its weight files")


def read_rows_f32(path: Path, entry: TensorEntry, row_start: int, row_end: int, step: int = 1) -> np.ndarray:
    """Rows [row_start, row_end) (every `step`-th) of a 2-D F32/F16/BF16 tensor as float32, mapped from the
    file so that only the pages of those rows are read. bf16 is the high half of a float32: it widens exactly."""
    if entry.dtype not in FLOAT_DTYPES or len(entry.shape) != 2:
        raise ModelDirError(f"{entry.name}: expected a 2-D {'/'.join(FLOAT_DTYPES)} tensor, got {entry.dtype}")
    itemsize = SAFETENSORS_ITEMSIZE[entry.dtype]
    matrix = np.memmap(path, dtype=f"<u{itemsize}", mode="r", offset=entry.start, shape=entry.shape)
    raw = matrix[row_start:row_end:step]
    if entry.dtype == "F32":
        return np.array(raw.view(np.float32))
    if entry.dtype == "F16":
        return raw.view(np.float16).astype(np.float32)
    widened = np.zeros((raw.shape[0], entry.shape[1] * 2), dtype=np.uint16)  # little-endian: high half second
    widened[:, 1::2] = raw
    return widened.view(np.float32)


def f32_to_bytes(values: np.ndarray, dtype: str) -> bytes:
    """float32 values as the bytes of a safetensors `dtype` (bf16 rounded to nearest even, as torch does)."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    if dtype == "F32":
        return values.tobytes()
    if dtype == "F16":
        return values.astype("<f2").tobytes()
    if dtype != "BF16":
        raise ModelDirError(f"cannot write float values as {dtype}")
    bits = values.view(np.uint32)
    rounded = bits + (np.uint32(0x7FFF) + ((bits >> 16) & 1))
    rounded = np.where(np.isnan(values), bits | 0x00400000, rounded)  # keep NaN a (quiet) NaN
    return (rounded >> 16).astype("<u2").tobytes()


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
        nbytes = SAFETENSORS_ITEMSIZE[dtype] * int(np.prod(shape, dtype=np.int64))
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
