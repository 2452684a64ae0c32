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


def all_reduce(value: torch.Tensor, env: DistEnv, op: str = "sum") -> torch.Tensor:
    """`value` reduced in place over all ranks with `sum`, `max` or `min` (unchanged in one process)."""
    if env.is_distributed:
        dist.all_reduce(value, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
    return value


def barrier(env: DistEnv) -> None:
    if env.is_distributed:
        dist.barrier()


def destroy(env: DistEnv) -> None:
    if env.is_distributed and dist.is_initialized():
        dist.destroy_process_group()
