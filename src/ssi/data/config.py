"""From a `data` preset (conf/data/{cpt,sft}/*.yaml) to validated datasets and DataLoaders.

The recipes, `scripts/inspect_data.py` and `scripts/generate.py` all go through `build_dataset`, so the
sequences a user inspects are exactly the ones the model trains on.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ssi.data.audio_sft import AudioSFTDataset, audio_columns
from ssi.data.cpt import CPTDataset, CPTOptions, SpanSampler
from ssi.data.durations import duration_cache_dir, read_durations
from ssi.data.encoded import MANIFEST_NAME, folder_encoder
from ssi.data.holdout import HoldOut
from ssi.data.sft import SFTDataset, SFTOptions
from ssi.data.sources import (
    ColumnNames,
    DataValidationError,
    Encoder,
    MissingSplitError,
    SourceSpec,
    ValidationReport,
    has_alignments,
    load_source,
    source_kind,
    validate_dataset,
)
from ssi.encode import EncodeError
from ssi.encode.sources import AudioSourceSpec, load_audio_source
from ssi.model.speech_encoder import AudioSlots
from ssi.vocab.tiktoken import SpeechLlama3Tokenizer

LOGGER = logging.getLogger(__name__)
SPLITS = ("train", "dev", "test")


def config_value(cfg: Mapping[str, Any], key: str) -> Any:
    """A required key, with the dotted path in the error (Hydra's own message lacks the preset context)."""
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise DataValidationError(f"data config: missing key data.{key}")
        node = node[part]
    return node


def encoder_from_config(cfg: Mapping[str, Any]) -> Encoder:
    enc = config_value(cfg, "encoder")
    if enc is None:
        raise DataValidationError(
            "data.encoder: the preset names no encoder (data=*/encoded reads it from encoding.json)"
        )
    return Encoder.from_mapping(enc)


def section_encoder(cfg: Mapping[str, Any], source: str) -> Encoder:
    """The units' encoder: what the source folder's encoding.json records (the truth, since it made them),
    else the preset's `encoder`; a preset that says otherwise than the folder is overruled, with a warning."""
    recorded = folder_encoder(source)
    if recorded is None:
        if config_value(cfg, "encoder") is None:
            raise DataValidationError(
                f"source {source} has no {MANIFEST_NAME} and the preset names no encoder: encode it with "
                "scripts/encode_audio.py, or pick a preset for this dataset (encoder@data.encoder=<conf/encoder name>)"
            )
        return encoder_from_config(cfg)
    if cfg.get("encoder") is not None and (preset := encoder_from_config(cfg)) != recorded:
        LOGGER.warning("%s records encoder %s; the preset's %s is not used", source, recorded, preset)
    return recorded


@dataclass(frozen=True)
class SectionSource:
    """What a preset section reads: its source spec, or train's with the rows of a `data.dev.from_train`
    hold-out (kept by train, held out as dev); `split` names that data in result folders."""

    spec: SourceSpec
    holdout: HoldOut | None
    held_out: bool
    split: str


def _spec(ds_cfg: Mapping[str, Any]) -> SourceSpec:
    return SourceSpec(
        source=str(ds_cfg["source"]),
        split=str(ds_cfg["split"]),
        n_samples=ds_cfg.get("n_samples"),
        shuffle_seed=ds_cfg.get("shuffle_seed"),
    )


def section_source(cfg: Mapping[str, Any], section: str) -> SectionSource:
    """The data a preset section (`train`, `dev`, `test`) reads; a section set to null is an error naming it."""
    if section not in SPLITS:
        raise DataValidationError(f"split must be one of {SPLITS}, got {section!r}")
    if cfg.get(section) is None:
        raise MissingSplitError(f"data.{section} is null: this preset has no {section} section")
    dev = cfg.get("dev")
    holdout = HoldOut.from_config(dev.get("from_train")) if dev is not None else None
    if holdout is None or section == "test":
        spec = _spec(config_value(cfg, f"{section}.dataset"))
        return SectionSource(spec, None, False, spec.split)
    train = _spec(config_value(cfg, "train.dataset"))
    held_out = section == "dev"
    split = f"{train.split}_{holdout.label}" if held_out else f"{train.split}_without_{holdout.label}"
    return SectionSource(train, holdout, held_out, split)


def columns_from_config(cfg: Mapping[str, Any]) -> ColumnNames:
    """The units columns (`audio` names the audio column of a preset shared with the features method)."""
    return ColumnNames(**{k: str(v) for k, v in config_value(cfg, "columns").items() if k != "audio"})


def needs_alignments(options: CPTOptions) -> bool:
    """Interleaved sequences cut speech at word times; every other sequence type uses the transcript."""
    if options.sequence_type == "mixture":
        return any(kind == "interleaved" and weight > 0 for kind, weight in (options.mixture or {}).items())
    return options.sequence_type == "interleaved"


def cpt_options_from_config(cfg: Mapping[str, Any]) -> CPTOptions:
    seq = config_value(cfg, "sequence")
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
    seq, sft = config_value(cfg, "sequence"), config_value(cfg, "sft")
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
    """A split ready for a DataLoader, with what validation found (`encoder`: the units' encoder; None for audio)."""

    dataset: CPTDataset | SFTDataset | AudioSFTDataset
    report: ValidationReport
    encoder: Encoder | None


# What to do when a section's split is missing from its source (a corpus with train and test only).
_WAYS_OUT = {
    "dev": ". Hold out part of train with data.dev.from_train=<fraction or count> (e.g. 0.05), point "
    "data.dev.dataset.source / .split at dev data, or train without a dev split with data.dev=null",
    "test": ". Point data.test.dataset.source / .split at test data, or set gen.split to a split the source has",
    "train": ". Point data.train.dataset.source / .split at the training data",
}


def data_input(cfg: Mapping[str, Any]) -> str:
    """What a preset's rows hold: `units` (DSU ids, the units method) or `audio` (the features method)."""
    value = str(cfg.get("input", "units"))
    if value not in ("units", "audio"):
        raise DataValidationError(f"data.input must be units or audio, got {value!r}")
    return value


def build_dataset(
    cfg: Mapping[str, Any],
    split: str,
    tokenizer: SpeechLlama3Tokenizer,
    *,
    inference: bool = False,
    audio_slots: AudioSlots | None = None,
) -> BuiltSplit:
    """Load, validate and wrap one split (`train`, `dev` or `test`) of a data preset; an audio preset needs
    `audio_slots` (from the features method: how many prompt positions an utterance takes)."""
    where = section_source(cfg, split)
    if data_input(cfg) == "audio":
        return _build_audio(cfg, split, where, tokenizer, audio_slots, inference)
    if tokenizer.vocab is None:
        raise DataValidationError("the data pipeline needs a speech-extended model (ssi.json)")
    spec = where.spec
    source_kind(spec)  # a source that names nothing is said first, before what it would have recorded
    encoder = section_encoder(cfg, spec.resolved)
    encoder.check_vocab(tokenizer.vocab)
    columns = columns_from_config(cfg)
    validation = config_value(cfg, "validation")
    try:
        raw = load_source(spec, columns)
    except MissingSplitError as err:
        raise MissingSplitError(f"{err}{_WAYS_OUT.get(split, '')}") from None
    if where.holdout is not None:
        raw = where.holdout.select(raw, columns.id, where.held_out, f"{spec.resolved}[{spec.split}]")
    if config_value(cfg, "kind") == "cpt" and not has_alignments(raw, columns):
        options = cpt_options_from_config(cfg)
        if needs_alignments(options):
            raise DataValidationError(
                f"{spec.resolved}[{spec.split}] has no word alignments (columns {columns.alignment()}), which "
                f"interleaved CPT needs (data.sequence.type={options.sequence_type}"
                f"{f', mixture {options.mixture}' if options.mixture else ''}): use a concatenated_*, dsu_only or "
                "text_only sequence type, SFT, or data with word alignments"
            )
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
    kind = config_value(cfg, "kind")
    if kind == "cpt":
        if inference:
            raise DataValidationError("inference prompts are built from SFT presets (data=sft/<preset>)")
        dataset: CPTDataset | SFTDataset = CPTDataset(ds, tokenizer, encoder.fps, cpt_options_from_config(cfg), columns)
    elif kind == "sft":
        dataset = SFTDataset(ds, tokenizer, sft_options_from_config(cfg), columns, inference=inference)
    else:
        raise DataValidationError(f"data.kind must be 'cpt' or 'sft', got {kind!r}")
    return BuiltSplit(dataset, report, encoder)


def _build_audio(
    cfg: Mapping[str, Any],
    section: str,
    where: SectionSource,
    tokenizer: SpeechLlama3Tokenizer,
    slots: AudioSlots | None,
    inference: bool,
) -> BuiltSplit:
    if slots is None:
        raise DataValidationError(
            "this data preset holds audio (data.input=audio), which method=features reads "
            "(speech_encoder.model=<encoder>); the units method reads a preset of encoded units"
        )
    if config_value(cfg, "kind") != "sft":
        raise DataValidationError("audio presets are SFT presets (kind: sft)")
    if bool(config_value(cfg, "packing.enabled")):
        raise DataValidationError("data.packing.enabled: audio batches are padded, never packed (set it to false)")
    read = "train" if where.holdout is not None and section != "test" else section
    ds_cfg = config_value(cfg, f"{read}.dataset")
    spec = AudioSourceSpec(where.spec.resolved, where.spec.split, ds_cfg.get("config"), ds_cfg.get("revision"))
    # a section may read a source with other column names (a test set of another corpus): `data.<section>.columns`
    columns = {**config_value(cfg, "columns"), **(cfg[read].get("columns") or {})}
    try:
        source = load_audio_source(spec, audio_columns(columns))
    except EncodeError as err:
        raise DataValidationError(str(err)) from None
    # as for units (load_source, then the hold-out): the first n_samples rows after the seeded shuffle, then
    # the rows of a dev split held out of train by id
    rows = list(range(len(source)))
    if where.spec.shuffle_seed is not None:
        rows = [rows[i] for i in np.random.default_rng(int(where.spec.shuffle_seed)).permutation(len(rows))]
    if where.spec.n_samples is not None:
        rows = rows[: int(where.spec.n_samples)]
    if where.holdout is not None:
        kept = where.holdout.rows([source.ids[row] for row in rows], where.held_out, source.name)
        rows = [rows[k] for k in kept]
    cache = duration_cache_dir(cfg.get("duration_cache"))
    durations = read_durations(source, rows, cache, progress=bool(cfg.get("progress", False)))
    dataset = AudioSFTDataset(source, rows, durations, tokenizer, sft_options_from_config(cfg), slots, inference)
    report = ValidationReport(source=source.name, n_rows=len(rows))
    return BuiltSplit(dataset, report, None)


__all__ = [
    "BuiltSplit",
    "build_dataset",
    "columns_from_config",
    "cpt_options_from_config",
    "data_input",
    "encoder_from_config",
    "needs_alignments",
    "section_source",
    "sft_options_from_config",
]
