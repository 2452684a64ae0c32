"""From a `data` preset (conf/data/{cpt,sft}/*.yaml) to validated datasets and DataLoaders.

The recipes, `scripts/inspect_data.py` and `scripts/generate.py` all go through `build_dataset`, so the
sequences a user inspects are exactly the ones the model trains on.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, DistributedSampler

from ssi.data.collate import TokenKinds, collate_packed, collate_padded
from ssi.data.cpt import CPTDataset, CPTOptions, SpanSampler
from ssi.data.packing import PackedDataset
from ssi.data.sft import SFTDataset, SFTOptions
from ssi.data.sources import (
    ColumnNames,
    DataValidationError,
    Encoder,
    SourceSpec,
    ValidationReport,
    load_source,
    validate_dataset,
)
from ssi.tokenizer import SpeechLlama3Tokenizer

LOGGER = logging.getLogger(__name__)
SPLITS = ("train", "dev", "test")


def _get(cfg: Mapping[str, Any], key: str) -> Any:
    """A required key, with the dotted path in the error (Hydra's own message lacks the preset context)."""
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise DataValidationError(f"data config: missing key data.{key}")
        node = node[part]
    return node


def encoder_from_config(cfg: Mapping[str, Any]) -> Encoder:
    enc = _get(cfg, "encoder")
    return Encoder(str(enc["name"]), int(enc["n_units"]), int(enc["sampling_rate"]), int(enc["downsampling_ratio"]))


def columns_from_config(cfg: Mapping[str, Any]) -> ColumnNames:
    return ColumnNames(**{k: str(v) for k, v in _get(cfg, "columns").items()})


def cpt_options_from_config(cfg: Mapping[str, Any]) -> CPTOptions:
    seq = _get(cfg, "sequence")
    mixture = seq.get("mixture")
    return CPTOptions(
        sequence_type=str(seq["type"]),
        mixture={str(k): float(v) for k, v in mixture.items()} if mixture else None,
        span=SpanSampler(**dict(seq["span"])),
        dedup=bool(seq["dedup"]),
        modality_tokens=bool(seq["modality_tokens"]),
        add_bos=bool(seq["add_bos"]),
        add_eos=bool(seq["add_eos"]),
        max_seq_len=seq["max_seq_len"],
        seed=int(seq["seed"]),
    )


def sft_options_from_config(cfg: Mapping[str, Any]) -> SFTOptions:
    seq, sft = _get(cfg, "sequence"), _get(cfg, "sft")
    return SFTOptions(
        system_prompt=sft.get("system_prompt"),
        instruction=sft.get("instruction"),
        train_on_input=bool(sft["train_on_input"]),
        modality_tokens=bool(seq["modality_tokens"]),
        dedup=bool(seq["dedup"]),
        max_seq_len=seq["max_seq_len"],
    )


@dataclass
class BuiltSplit:
    """A split ready for a DataLoader, with what validation found."""

    dataset: CPTDataset | SFTDataset
    report: ValidationReport
    encoder: Encoder


def build_dataset(
    cfg: Mapping[str, Any], split: str, tokenizer: SpeechLlama3Tokenizer, *, inference: bool = False
) -> BuiltSplit:
    """Load, validate and wrap one split (`train`, `dev` or `test`) of a data preset."""
    if split not in SPLITS:
        raise DataValidationError(f"split must be one of {SPLITS}, got {split!r}")
    if tokenizer.vocab is None:
        raise DataValidationError("the data pipeline needs a speech-extended model (ssi.json)")
    encoder = encoder_from_config(cfg)
    encoder.check_vocab(tokenizer.vocab)
    columns = columns_from_config(cfg)
    ds_cfg = _get(cfg, f"{split}.dataset")
    spec = SourceSpec(
        source=str(ds_cfg["source"]),
        split=str(ds_cfg["split"]),
        n_samples=ds_cfg.get("n_samples"),
        shuffle_seed=ds_cfg.get("shuffle_seed"),
    )
    validation = _get(cfg, "validation")
    raw = load_source(spec, columns)
    ds, report = validate_dataset(
        raw,
        columns,
        tokenizer.vocab.n_dsus,
        encoder.fps,
        on_empty=validation["on_empty"],
        tolerance_frames=float(validation["tolerance_frames"]),
        source=f"{spec.resolved}[{spec.split}]",
    )
    if len(ds) == 0:
        raise DataValidationError(f"{spec.resolved}[{spec.split}]: no samples left after validation")
    kind = _get(cfg, "kind")
    if kind == "cpt":
        if inference:
            raise DataValidationError("inference prompts are built from SFT presets (data=sft/<preset>)")
        dataset: CPTDataset | SFTDataset = CPTDataset(ds, tokenizer, encoder.fps, cpt_options_from_config(cfg), columns)
    elif kind == "sft":
        dataset = SFTDataset(ds, tokenizer, sft_options_from_config(cfg), columns, inference=inference)
    else:
        raise DataValidationError(f"data.kind must be 'cpt' or 'sft', got {kind!r}")
    return BuiltSplit(dataset, report, encoder)


def build_dataloader(
    cfg: Mapping[str, Any],
    split: str,
    built: BuiltSplit,
    tokenizer: SpeechLlama3Tokenizer,
    *,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
) -> DataLoader:
    """DataLoader for a training/eval split: padded batches through a DistributedSampler, or packs.
    `pin_memory` (CUDA training) lets batches reach the GPU with non-blocking copies.

    Call `loader.sampler.set_epoch(e)` (padded) or `loader.dataset.set_epoch(e)` (packed) plus
    `built.dataset.set_epoch(e)` at each epoch; `set_loader_epoch` does all of it.
    """
    assert tokenizer.vocab is not None
    loader_cfg = _get(cfg, f"{split}.dataloader")
    kinds = TokenKinds.from_vocab(tokenizer.vocab)
    seed = int(_get(cfg, "sequence.seed"))
    workers = int(loader_cfg.get("num_workers", 0))
    common: dict[str, Any] = {
        "batch_size": int(loader_cfg["batch_size"]),
        "num_workers": workers,
        "drop_last": bool(loader_cfg.get("drop_last", False)),
        "pin_memory": pin_memory,
    }
    if bool(_get(cfg, "packing.enabled")):
        max_seq_len = _get(cfg, "sequence.max_seq_len")
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
            open_packs=int(_get(cfg, "packing.open_packs")),
        )
        return DataLoader(packed, collate_fn=partial(collate_packed, kinds=kinds), **common)
    sampler = DistributedSampler(
        built.dataset,
        num_replicas=world_size,
        rank=rank,
        shuffle=bool(loader_cfg.get("shuffle", False)),
        seed=seed,
        drop_last=bool(loader_cfg.get("drop_last", False)),
    )
    return DataLoader(
        built.dataset,
        sampler=sampler,
        collate_fn=partial(
            collate_padded,
            pad_id=tokenizer.pad_id,
            kinds=kinds,
            pad_to_multiple_of=int(loader_cfg.get("pad_to_multiple_of", 1)),
            max_length=_get(cfg, "sequence.max_seq_len"),
        ),
        **common,
    )


def set_loader_epoch(loader: DataLoader, epoch: int) -> None:
    """Advance every epoch-dependent draw of a loader from `build_dataloader` (sample order and sequences)."""
    if isinstance(loader.dataset, PackedDataset):
        loader.dataset.set_epoch(epoch)
        return
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)
    dataset = loader.dataset
    if isinstance(dataset, (CPTDataset, SFTDataset)):
        dataset.set_epoch(epoch)


def to_container(cfg: Any) -> Any:
    """A plain dict from an OmegaConf node (or a dict), resolving interpolations."""
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


__all__ = [
    "BuiltSplit",
    "build_dataloader",
    "build_dataset",
    "columns_from_config",
    "cpt_options_from_config",
    "encoder_from_config",
    "set_loader_epoch",
    "sft_options_from_config",
    "to_container",
]
