"""Which device a process computes on, decided from what the job was given, never silently the CPU.

Training, generation and evaluation all resolve their `device` setting here: `auto` takes CUDA when torch
sees a GPU and refuses the CPU where the environment says the job owns GPUs (docs/training.md).
"""

from __future__ import annotations

import os

import torch

# Variables through which Slurm or the user tell a process that it owns GPUs: lists of GPU ids, then counts.
GPU_ID_VARS = ("CUDA_VISIBLE_DEVICES", "SLURM_STEP_GPUS", "SLURM_JOB_GPUS")
GPU_COUNT_VARS = ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE", "SLURM_GPUS_PER_TASK", "SLURM_GPUS")
_NO_GPU_IDS = ("", "-1", "none", "nodevfiles")


def gpu_allocation_hint() -> str | None:
    """`NAME=value` of the first variable saying this process was given GPUs (None: nothing says so)."""
    for name in (*GPU_ID_VARS, *GPU_COUNT_VARS):
        value = os.environ.get(name)
        if value is None:
            continue
        text = value.strip().lower()
        no_gpu = text in _NO_GPU_IDS or (name in GPU_COUNT_VARS and text.split(":")[-1] in ("0", ""))
        if not no_gpu:
            return f"{name}={value}"
    return None


def local_cuda_ordinal(local_rank: int, device_count: int) -> int:
    """The GPU a rank drives: its local rank, wrapped to the GPUs it can see (Slurm may bind one per task,
    so every task sees `cuda:0` only)."""
    if device_count < 1:
        raise ValueError("no CUDA device is visible to this process")
    return local_rank % device_count


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """`auto` (CUDA when available), `cpu`, `cuda` (this rank's GPU) or `cuda:<n>`.

    `auto` never falls back to the CPU silently where the job was given GPUs (a CPU build of torch in
    a GPU allocation would train for days at a fraction of the speed): it raises, naming the variable."""
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif (hint := gpu_allocation_hint()) is not None:
            raise ValueError(
                f"device=auto: {hint} says this job has GPUs, but torch {torch.__version__} sees none "
                f"({'a CPU-only build' if torch.version.cuda is None else 'CUDA build, no usable device'}); "
                "install the CUDA build (make install GPU=1) or pass device=cpu to train on the CPU on purpose"
            )
        else:
            name = "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {name} was asked for but no CUDA device is available (use cpu or auto)")
        try:
            device = (
                torch.device("cuda", local_cuda_ordinal(local_rank, torch.cuda.device_count()))
                if name == "cuda"
                else torch.device(name)
            )
        except RuntimeError:
            raise ValueError(f"device must be auto, cpu, cuda or cuda:<n>, got {name!r}") from None
        torch.cuda.set_device(device)
        return device
    if name != "cpu":
        raise ValueError(f"device must be auto, cpu, cuda or cuda:<n>, got {name!r}")
    return torch.device("cpu")
