"""One process group whether the recipe was started by `torchrun`, by `srun`, or by plain `python`.

torchrun exports RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT. Under `srun` without torchrun
(one task per GPU, possibly on several nodes) the same facts come from SLURM_PROCID/SLURM_NTASKS/
SLURM_LOCALID, and the rendezvous host is the first node of the job. A single plain process needs no
process group at all.
"""

from __future__ import annotations

import logging
import os
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


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


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """`auto` (CUDA when available), `cpu`, `cuda` (this process's LOCAL_RANK GPU) or `cuda:<n>`."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {name} was asked for but no CUDA device is available (use cpu or auto)")
        try:
            device = torch.device("cuda", local_rank) if name == "cuda" else torch.device(name)
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


def init_distributed(device: torch.device) -> DistEnv:
    """Join the process group when launched with several processes (NCCL on CUDA, gloo on CPU)."""
    env = env_from_launcher()
    if env.is_distributed and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
        log.info("rank %d/%d joined the %s process group", env.rank, env.world_size, backend)
    return env


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
