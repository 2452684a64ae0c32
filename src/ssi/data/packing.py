"""Sequence packing in a bounded buffer (torchtune's packed format, without its whole-dataset RAM cost).

torchtune's `PackedDataset` builds every pack up front, holding the token lists of the whole dataset in
memory: on MLS (10.8M utterances) the reference implementation ran out of CPU RAM. Here samples stream
through at most `open_packs` partially filled packs (first fit; when none fits and the buffer is full,
the fullest pack is emitted), so memory is bounded by `open_packs * max_seq_len` tokens whatever the
dataset size. Each pack has `tokens`, `labels`, `input_pos` (restarting at 0 per document), `seq_lens`
(padding counted as a final document, as torchtune does) and `n_padding`.

The sample order of an epoch is a permutation seeded by (seed, epoch); it is split across ranks (equal
counts, the tail dropped like `DistributedSampler(drop_last=True)`) and then across DataLoader workers.
Each sample itself is still a pure function of (seed, epoch, index) (see `CPTDataset`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX


class PackedDataset(torch.utils.data.IterableDataset):
    """Stream packs of at most `max_seq_len` tokens from a map-style dataset of `{"tokens", "labels"}`."""

    def __init__(
        self,
        dataset: torch.utils.data.Dataset,
        max_seq_len: int,
        pad_id: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        open_packs: int = 64,
    ) -> None:
        if max_seq_len < 1 or open_packs < 1:
            raise ValueError(f"max_seq_len and open_packs must be >= 1, got {max_seq_len}, {open_packs}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.dataset, self.max_seq_len, self.pad_id = dataset, max_seq_len, pad_id
        self.shuffle, self.seed, self.rank, self.world_size = shuffle, seed, rank, world_size
        self.open_packs = open_packs
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Call before iterating (as with DistributedSampler); workers copy the dataset at that point."""
        self.epoch = epoch
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def sample_indices(self, worker_id: int = 0, num_workers: int = 1) -> np.ndarray:
        """Dataset indices this rank and worker pack in the current epoch, in order."""
        n = len(self.dataset)  # type: ignore[arg-type]
        if self.shuffle:
            order = np.random.Generator(np.random.PCG64([self.seed, self.epoch])).permutation(n)
        else:
            order = np.arange(n)
        per_rank = n // self.world_size
        return order[self.rank :: self.world_size][:per_rank][worker_id::num_workers]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        indices = self.sample_indices(info.id if info else 0, info.num_workers if info else 1)
        packs: list[list[dict[str, Any]]] = []
        fill: list[int] = []
        for index in indices:
            sample = self.dataset[int(index)]
            n = len(sample["tokens"])
            if n > self.max_seq_len:
                raise ValueError(
                    f"sample {index} has {n} tokens, more than the pack size {self.max_seq_len}: "
                    "set the sequence max_seq_len to at most the packing max_seq_len"
                )
            slot = next((i for i, used in enumerate(fill) if used + n <= self.max_seq_len), None)
            if slot is None:
                if len(packs) == self.open_packs:
                    fullest = int(np.argmax(fill))
                    yield self._finish(packs.pop(fullest))
                    fill.pop(fullest)
                packs.append([])
                fill.append(0)
                slot = len(packs) - 1
            packs[slot].append(sample)
            fill[slot] += n
        for pack in packs:
            yield self._finish(pack)

    def _finish(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        length = self.max_seq_len
        tokens = torch.full((length,), self.pad_id, dtype=torch.long)
        labels = torch.full((length,), CROSS_ENTROPY_IGNORE_IDX, dtype=torch.long)
        input_pos = torch.zeros(length, dtype=torch.long)
        seq_lens = []
        at = 0
        for sample in samples:
            n = len(sample["tokens"])
            tokens[at : at + n] = torch.as_tensor(sample["tokens"], dtype=torch.long)
            labels[at : at + n] = torch.as_tensor(sample["labels"], dtype=torch.long)
            # A document's first token is never a target: after the loop's shift it would be predicted from
            # the previous document, which padded batches never do.
            labels[at] = CROSS_ENTROPY_IGNORE_IDX
            input_pos[at : at + n] = torch.arange(n)
            seq_lens.append(n)
            at += n
        n_padding = length - at
        if n_padding:
            # torchtune's convention: padding is one more document whose positions continue the last one.
            last = int(input_pos[at - 1]) if at else -1
            input_pos[at:] = torch.clamp(torch.arange(last + 1, last + 1 + n_padding), max=length - 1)
            seq_lens.append(n_padding)
        return {
            "tokens": tokens,
            "labels": labels,
            "input_pos": input_pos,
            "seq_lens": torch.tensor(seq_lens, dtype=torch.long),
            "n_padding": torch.tensor(n_padding, dtype=torch.long),
        }
