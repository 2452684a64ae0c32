"""One process group whether the recipe was started by `torchrun`, by `srun`, or by plain `python`.

torchrun exports RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT. Under `srun` without torchrun
(one task per GPU, possibly on several nodes) the same facts come from SLURM_PROCID/SLURM_NTASKS/
SLURM_LOCALID, and the rendezvous host is the first node of the job. A single plain process needs no
process group at all.
"""

from __future__ import annotations

import datetime
import logging
import os
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 3600.0


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


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


def _first_slurm_host() -> str:
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST", "")
    try:
        hosts = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
        return hosts.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return "127.0.0.1"


def env_from_launcher() -> DistEnv:
    """Rank, world size and local rank from torchrun's or Slurm's variables (exported for torch if Slurm's)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return DistEnv(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    ntasks = int(os.environ.get("SLURM_NTASKS", "1"))
    if ntasks > 1 and "SLURM_PROCID" in os.environ:
        env = DistEnv(int(os.environ["SLURM_PROCID"]), ntasks, int(os.environ.get("SLURM_LOCALID", 0)))
        os.environ.update(RANK=str(env.rank), WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank))
        os.environ.setdefault("MASTER_ADDR", _first_slurm_host())
        os.environ.setdefault("MASTER_PORT", str(29500 + int(os.environ.get("SLURM_JOB_ID", "0")) % 1000))
        return env
    return DistEnv()


def init_distributed(device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S) -> DistEnv:
    """Join the process group when launched with several processes (NCCL on CUDA, gloo on CPU).

    `timeout_s` bounds how long a collective waits for the slowest rank: it must exceed the longest
    one-rank pause, e.g. rank 0 writing and fsyncing a 3B checkpoint while the others wait at a barrier
    (NCCL's own default, 10 minutes, does not). On CUDA the group is bound to this rank's GPU."""
    env = env_from_launcher()
    if env.is_distributed and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=device if device.type == "cuda" else None,
        )
        log.info(
            "rank %d/%d joined the %s process group (timeout %.0f s)", env.rank, env.world_size, backend, timeout_s
        )
    return env


def shard_model(model: torch.nn.Module, layer_type: type, compute_dtype: torch.dtype | None = None) -> None:
    """FSDP2: every `layer_type` module is one unit (its parameters are gathered just for its own forward and
    backward), the root module holds the rest (embeddings, final norm, output head).

    `compute_dtype` (e.g. bf16) keeps the sharded parameters, gradients and optimizer states in their own
    dtype (fp32 master weights) while each gathered layer computes in `compute_dtype`; gradients are
    reduced across ranks in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = (
        MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
        if compute_dtype is not None
        else MixedPrecisionPolicy()
    )
    layers = [m for m in model.modules() if isinstance(m, layer_type)]
    if not layers:
        raise ValueError(f"no {layer_type.__name__} module to shard in {type(model).__name__}")
    for layer in layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


def all_reduce_sum(value: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.is_distributed:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def all_reduce_max(value: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.is_distributed:
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value


def all_reduce_min(value: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.is_distributed:
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return value


def barrier(env: DistEnv) -> None:
    if env.is_distributed:
        dist.barrier()


def destroy(env: DistEnv) -> None:
    if env.is_distributed and dist.is_initialized():
        dist.destroy_process_group()
