"""Which samples each rank trains on at each step: deterministic, resumable, world-size independent.

An epoch is one seeded permutation of the dataset. Optimizer step `s` of the epoch consumes the
`global_batch` samples at positions `[s * global_batch, (s + 1) * global_batch)` of that permutation;
rank `r` of `W` takes an equal contiguous slice of them and splits it into `grad_accum` micro-batches.
The set of samples behind a step therefore depends only on (seed, epoch, step) and the global batch
size, not on how many processes share it, so 2 ranks reproduce 1 rank's loss and a checkpoint resumes
mid-epoch on any world size by starting at its step.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class GlobalBatchSampler(Sampler[list[int]]):
    """Yields this rank's micro-batches (lists of dataset indices), `grad_accum` per optimizer step.

    Incomplete global batches at the end of an epoch are dropped so every step has the same size.
    `start_step` skips the steps of the current epoch that a resumed run has already taken.
    """

    def __init__(
        self,
        dataset_size: int,
        micro_batch_size: int,
        grad_accum: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        if micro_batch_size < 1 or grad_accum < 1:
            raise ValueError(
                f"batch_size and gradient_accumulation_steps must be >= 1, got {micro_batch_size}, {grad_accum}"
            )
        self.dataset_size = dataset_size
        self.micro_batch_size = micro_batch_size
        self.grad_accum = grad_accum
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.seed = shuffle, seed
        self.global_batch = micro_batch_size * grad_accum * world_size
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the training split has {dataset_size} samples, fewer than one global batch of {self.global_batch} "
                f"(batch_size {micro_batch_size} x gradient_accumulation_steps {grad_accum} x {world_size} ranks)"
            )
        self.epoch = 0
        self.start_step = 0

    @property
    def steps_per_epoch(self) -> int:
        return self.dataset_size // self.global_batch

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def epoch_order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.dataset_size))
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(self.dataset_size, generator=gen).tolist()

    def __iter__(self) -> Iterator[list[int]]:
        order = self.epoch_order()
        per_rank = self.global_batch // self.world_size
        for step in range(self.start_step, self.steps_per_epoch):
            first = step * self.global_batch + self.rank * per_rank
            mine = order[first : first + per_rank]
            for k in range(self.grad_accum):
                yield mine[k * self.micro_batch_size : (k + 1) * self.micro_batch_size]

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.grad_accum
