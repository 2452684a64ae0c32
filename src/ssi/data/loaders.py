"""From a built split to batches: the one place where DataLoaders are made.

Padded batches (`collate_padded`, rounded up to `pad_to_multiple_of` within the model's sequence limit)
or packs (`PackedDataset` + `collate_packed`), each rank reading its own share: through a
DistributedSampler for evaluation, or through the training recipe's resumable batch sampler. Workers
build samples on the CPU only; batches go to pinned memory when the model trains on a GPU.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from ssi.data.audio_sft import AudioSFTDataset
from ssi.data.collate import collate_audio, collate_packed, collate_padded
from ssi.data.config import BuiltSplit, config_value
from ssi.data.cpt import CPTDataset
from ssi.data.packing import PackedDataset
from ssi.data.sft import SFTDataset
from ssi.data.sources import DataValidationError
from ssi.vocab.tiktoken import SpeechLlama3Tokenizer


def _loader(dataset: Dataset, collate: Callable, *, pin_memory: bool, num_workers: int, **batching: Any) -> DataLoader:
    return DataLoader(dataset, collate_fn=collate, pin_memory=pin_memory, num_workers=num_workers, **batching)


def padded_collate(
    tokenizer: SpeechLlama3Tokenizer, pad_to_multiple_of: int = 1, max_length: int | None = None, audio: bool = False
) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
    """Padded batches; `audio` examples, or any batch of a model without a speech vocabulary (the features
    method's base LLM), are collated with their audio and its slots counted."""
    common = {"pad_id": tokenizer.pad_id, "pad_to_multiple_of": pad_to_multiple_of, "max_length": max_length}
    if audio or tokenizer.vocab is None:
        return partial(collate_audio, n_bpe=tokenizer.base_vocab_size, **common)
    return partial(collate_padded, vocab=tokenizer.vocab, **common)


def build_dataloader(
    cfg: Mapping[str, Any],
    split: str,
    built: BuiltSplit,
    tokenizer: SpeechLlama3Tokenizer,
    *,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
    batch_sampler: Sampler[list[int]] | None = None,
) -> DataLoader:
    """The DataLoader of one split of a data preset: packs when `data.packing.enabled`, otherwise padded
    batches through a DistributedSampler, or through `batch_sampler` (the training recipe's resumable order).

    Call `set_loader_epoch(loader, e)` at each epoch (sample order and sequence draws).
    """
    loader_cfg = config_value(cfg, f"{split}.dataloader")
    seed = int(config_value(cfg, "sequence.seed"))
    max_seq_len = config_value(cfg, "sequence.max_seq_len")
    common = {"pin_memory": pin_memory, "num_workers": int(loader_cfg.get("num_workers", 0))}
    batching = {"batch_size": int(loader_cfg["batch_size"]), "drop_last": bool(loader_cfg.get("drop_last", False))}
    if bool(config_value(cfg, "packing.enabled")):
        if max_seq_len is None:
            raise DataValidationError("packing needs data.sequence.max_seq_len (the pack length)")
        packed = PackedDataset(
            built.dataset,
            int(max_seq_len),
            tokenizer.pad_id,
            shuffle=bool(loader_cfg.get("shuffle", False)),
            seed=seed,
            rank=rank,
            world_size=world_size,
            open_packs=int(config_value(cfg, "packing.open_packs")),
        )
        assert tokenizer.vocab is not None
        return _loader(packed, partial(collate_packed, vocab=tokenizer.vocab), **common, **batching)
    audio = isinstance(built.dataset, AudioSFTDataset)
    collate = padded_collate(tokenizer, int(loader_cfg.get("pad_to_multiple_of", 1)), max_seq_len, audio)
    if batch_sampler is not None:
        return _loader(built.dataset, collate, batch_sampler=batch_sampler, **common)
    sampler = DistributedSampler(
        built.dataset,
        num_replicas=world_size,
        rank=rank,
        shuffle=bool(loader_cfg.get("shuffle", False)),
        seed=seed,
        drop_last=batching["drop_last"],
    )
    return _loader(built.dataset, collate, sampler=sampler, **common, **batching)


def text_dataloader(
    dataset: Dataset,
    tokenizer: SpeechLlama3Tokenizer,
    batch_size: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
) -> DataLoader:
    """Padded batches of a plain-text evaluation set, each rank reading its share in file order."""
    sampler = DistributedSampler(dataset, world_size, rank, shuffle=False)
    collate = padded_collate(tokenizer)
    return _loader(dataset, collate, sampler=sampler, batch_size=batch_size, pin_memory=pin_memory, num_workers=0)


def set_loader_epoch(loader: DataLoader, epoch: int) -> None:
    """Advance every epoch-dependent draw of a loader from this module (sample order and sequences)."""
    if isinstance(loader.dataset, PackedDataset):
        loader.dataset.set_epoch(epoch)
        return
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)
    dataset = loader.dataset
    if isinstance(dataset, (CPTDataset, SFTDataset, AudioSFTDataset)):
        dataset.set_epoch(epoch)
