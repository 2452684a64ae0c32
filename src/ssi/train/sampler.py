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


class SecondsBatchSampler(Sampler[list[int]]):
    """Micro-batches holding at most `max_seconds` of audio (and at most `max_size` utterances), `grad_accum`
    per optimizer step and rank, for audio examples (ssi.data.audio_sft).

    Each epoch the samples are shuffled (seeded by seed and epoch), cut into windows of `window` samples,
    each window sorted by duration and cut greedily into micro-batches, so a batch holds similar lengths
    (little padding); then the micro-batches are shuffled. The list depends on the seed, the epoch and the
    data only, so a step is the same `grad_accum x world_size` micro-batches on any number of ranks with
    the same product; rank r takes the r-th `grad_accum` of them. Incomplete steps at the end are dropped.
    """

    def __init__(
        self,
        durations: list[float],
        max_seconds: float,
        grad_accum: int,
        *,
        max_size: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        window: int = 2048,
    ) -> None:
        if max_seconds <= 0 or max_size < 1 or grad_accum < 1:
            raise ValueError(
                f"batch_seconds, batch_size and gradient_accumulation_steps must be positive, got "
                f"{max_seconds}, {max_size}, {grad_accum}"
            )
        self.durations = durations
        self.max_seconds, self.max_size, self.window = float(max_seconds), max_size, window
        self.grad_accum, self.rank, self.world_size = grad_accum, rank, world_size
        self.shuffle, self.seed = shuffle, seed
        self.epoch, self.start_step = 0, 0
        self._batches: tuple[int, list[list[int]]] | None = None  # (epoch, its micro-batches)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the training split ({len(durations)} utterances, {sum(durations) / 3600:.2f} h) gives "
                f"{len(self.epoch_batches())} micro-batches of <= {max_seconds:g} s, fewer than one step of "
                f"{grad_accum} x {world_size} ranks: lower batch_seconds or gradient_accumulation_steps"
            )

    @property
    def steps_per_epoch(self) -> int:
        return len(self.epoch_batches()) // (self.grad_accum * self.world_size)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def epoch_batches(self) -> list[list[int]]:
        if self._batches is None or self._batches[0] != self.epoch:
            self._batches = (self.epoch, self._cut_epoch())
        return self._batches[1]

    def _cut_epoch(self) -> list[list[int]]:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        n = len(self.durations)
        order = torch.randperm(n, generator=gen).tolist() if self.shuffle else list(range(n))
        batches: list[list[int]] = []
        for start in range(0, n, self.window):
            current: list[int] = []
            seconds = 0.0
            for index in sorted(order[start : start + self.window], key=lambda i: self.durations[i]):
                if current and (seconds + self.durations[index] > self.max_seconds or len(current) == self.max_size):
                    batches.append(current)
                    current, seconds = [], 0.0
                current.append(index)
                seconds += self.durations[index]
            if current:
                batches.append(current)
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.epoch_batches()
        per_step = self.grad_accum * self.world_size
        for step in range(self.start_step, len(batches) // per_step):
            first = step * per_step + self.rank * self.grad_accum
            yield from batches[first : first + self.grad_accum]

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.grad_accum
