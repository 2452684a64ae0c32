"""Which part of a split this process encodes: `shard=i num_shards=N`, or from Slurm.

Shard i of N is the contiguous row range [i*n/N, (i+1)*n/N), so the shards in order are the split in
order and the union of N tasks' outputs equals a single-process run row for row. Under Slurm the
defaults come from the job: an array job's task index (`--array`, counted from its first index and
step), times the tasks of an `srun` step plus `SLURM_PROCID`. The batch script itself (outside srun) is
one task, whatever `--ntasks` says, so a forgotten `srun` never encodes only a fraction silently.
"""

from __future__ import annotations

from collections.abc import Mapping

from ssi.encode import EncodeError


def shard_range(n_rows: int, shard: int, num_shards: int) -> range:
    """Rows of shard `shard` of `num_shards`."""
    return range(shard * n_rows // num_shards, (shard + 1) * n_rows // num_shards)


def _int(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise EncodeError(f"{name}={value!r} is not an integer; pass shard= and num_shards= explicitly") from None


def slurm_shard(env: Mapping[str, str]) -> tuple[int, int, str] | None:
    """(shard, num_shards, how) from Slurm's variables, or None outside Slurm arrays and srun steps."""
    index, count, how = 0, 1, []
    array_id = _int(env, "SLURM_ARRAY_TASK_ID")
    if array_id is not None:
        first = _int(env, "SLURM_ARRAY_TASK_MIN") or 0
        step = _int(env, "SLURM_ARRAY_TASK_STEP") or 1
        count = _int(env, "SLURM_ARRAY_TASK_COUNT") or 1
        index = (array_id - first) // step
        if (array_id - first) % step or not 0 <= index < count:
            raise EncodeError(
                f"SLURM_ARRAY_TASK_ID={array_id} is not on the array's range (min {first}, step {step}, count "
                f"{count}); use --array=0-{count - 1} or pass shard= and num_shards="
            )
        how.append(f"SLURM_ARRAY_TASK_ID={array_id}")
    tasks = _int(env, "SLURM_STEP_NUM_TASKS")
    if tasks is not None and tasks > 1:
        procid = _int(env, "SLURM_PROCID") or 0
        index, count = index * tasks + procid, count * tasks
        how.append(f"SLURM_PROCID={procid} of SLURM_STEP_NUM_TASKS={tasks}")
    return (index, count, ", ".join(how)) if how else None


def resolve_shard(shard: int | None, num_shards: int | None, env: Mapping[str, str]) -> tuple[int, int, str]:
    """(shard, num_shards, where they came from): the settings when given, else Slurm, else 0 of 1."""
    if shard is None and num_shards is None:
        found = slurm_shard(env)
        if found is not None:
            return found
        shard, num_shards, how = 0, 1, "default"
    elif shard is None or num_shards is None:
        raise EncodeError("give both shard= and num_shards= (or neither: Slurm's variables, else 0 of 1)")
    else:
        how = "shard=/num_shards="
    if num_shards < 1 or not 0 <= shard < num_shards:
        raise EncodeError(f"shard={shard} num_shards={num_shards}: need 0 <= shard < num_shards")
    return shard, num_shards, how
