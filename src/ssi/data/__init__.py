"""Speech-text data pipeline: sources and validation, CPT sequences, SFT examples, batching, synthetic corpus.

The public entry points are re-exported here so that recipes import from `ssi.data` only.
"""

from ssi.data.collate import TokenKinds, collate_packed, collate_padded, count_token_kinds
from ssi.data.config import BuiltSplit, build_dataloader, build_dataset, set_loader_epoch
from ssi.data.cpt import CPTDataset, CPTOptions, SpanSampler, speech_span
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

__all__ = [
    "BuiltSplit",
    "CPTDataset",
    "CPTOptions",
    "ColumnNames",
    "DataValidationError",
    "Encoder",
    "PackedDataset",
    "SFTDataset",
    "SFTOptions",
    "SourceSpec",
    "SpanSampler",
    "TokenKinds",
    "ValidationReport",
    "build_dataloader",
    "build_dataset",
    "collate_packed",
    "collate_padded",
    "count_token_kinds",
    "load_source",
    "set_loader_epoch",
    "speech_span",
    "validate_dataset",
]
