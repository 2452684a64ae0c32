"""What a checkpoint carries so that a run continues exactly, and what a resumed run must share with it.

Besides the HF weights, a checkpoint's `training_state/` holds the optimizer and schedule state, the RNG
states, the position in the data, a fingerprint of the settings that change training (`RESUME_KEYS`), why
the run stopped, and the model's own tensors: for full training the master weights when the run keeps its
parameters more precisely than the HF weights are saved; on a frozen base (`new_embeddings`, `lora`)
only the trained tensors (`trained.safetensors`: new rows, adapters), the base being read from `model=`.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from safetensors.torch import load_file, save_file

from ssi import run_dir
from ssi.config import select

log = logging.getLogger(__name__)

STATE_VERSION = 1
# Settings a resumed run must share with the run that wrote the checkpoint (unless force_resume=true).
RESUME_KEYS = (
    "data.kind",
    "data.train.dataset",
    "data.train.dataloader.batch_seconds",  # audio presets: which utterances share every micro-batch
    "data.dev.from_train",  # which utterances are held out of training
    "data.sequence",
    "data.packing",
    "optimizer",
    "lr_scheduler",
    "max_steps",
    "trainable",
    "lora",
    "freeze",
    "method",
    "speech_encoder",
    "projector",
    "seed",
    "dtype",
    "mixed_precision",
    "loss",
    "global_batch_size",
)


class ResumeError(ValueError):
    """A checkpoint that cannot continue this run as configured."""


def fingerprint(cfg: DictConfig, global_batch_size: int) -> dict[str, Any]:
    """The values of `RESUME_KEYS` in this run (the global batch as computed, not as configured; `lora` only
    when LoRA trains, `freeze` only when it freezes anything, the features method's sections only with it, so
    that runs without them compare as before)."""
    values = {key: select(cfg, key) for key in RESUME_KEYS}
    values["global_batch_size"] = global_batch_size
    if values["trainable"] != "lora":
        values["lora"] = None
    values["freeze"] = values["freeze"] or None
    if values["method"] in (None, "units"):  # units runs compare as before the features method existed
        values["method"] = values["speech_encoder"] = values["projector"] = None
    return values


def check_resumable(state: dict[str, Any], current: dict[str, Any], ckpt_dir: Path, force: bool) -> None:
    """Refuse a training state of another version, or written with other settings unless `force`. A key the
    saved fingerprint lacks (a checkpoint written before the key was added to `RESUME_KEYS`) is not compared."""
    if state.get("version") != STATE_VERSION:
        raise ResumeError(f"{ckpt_dir}: training state version {state.get('version')} is not {STATE_VERSION}")
    saved = state["fingerprint"]
    changed = {key: (saved[key], value) for key, value in current.items() if key in saved and saved[key] != value}
    if changed and not force:
        lines = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
        raise ResumeError(
            f"resuming {ckpt_dir} with different settings ({lines}); pass force_resume=true to accept them"
        )
    if changed:
        log.warning("force_resume: continuing with changed settings %s", sorted(changed))


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def master_weights_writer(
    model_state: dict[str, torch.Tensor], param_dtype: torch.dtype, saved_dtype: torch.dtype
) -> Callable[[Path], None] | None:
    """A `training_state_writer` that keeps the parameters when they are more precise than the saved HF
    weights (fp32 master weights of a bf16 model): otherwise every resume would round away the small
    updates they have accumulated. None when the HF weights already hold them exactly."""
    if param_dtype.itemsize <= saved_dtype.itemsize:
        return None

    def write(folder: Path) -> None:
        save_file({k: v.contiguous() for k, v in model_state.items()}, str(folder / run_dir.MASTER_WEIGHTS_FILE))

    return write


def kept_tensors_writer(tensors: dict[str, torch.Tensor]) -> Callable[[Path], None]:
    """A `training_state_writer` for the tensors a frozen-base run trains, in their own (master) dtype."""

    def write(folder: Path) -> None:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / run_dir.TRAINED_TENSORS_FILE))

    return write


def load_kept_tensors(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    path = run_dir.training_state_dir(ckpt_dir) / run_dir.TRAINED_TENSORS_FILE
    if not path.is_file():
        raise ResumeError(
            f"{ckpt_dir}: no {path.name} in its training state, so it was not written with trainable=new_embeddings "
            "or lora: resume it with the trainable= it was trained with, or start a new run from it (model=<it>)"
        )
    return load_file(path)


def load_master_weights(ckpt_dir: Path) -> dict[str, torch.Tensor] | None:
    """The master weights a checkpoint kept (torchtune names), or None when its HF weights are exact."""
    path = run_dir.training_state_dir(ckpt_dir) / run_dir.MASTER_WEIGHTS_FILE
    return load_file(path) if path.is_file() else None
