"""Speech-text data: sources and validation (`sources`), CPT sequences (`cpt`), SFT examples (`sft`),
batching (`collate`, `packing`, `loaders`), presets (`config`), the synthetic corpus, inspection
statistics and plain-text evaluation data. A row walks forward: source -> validated row -> sequence ->
batch. docs/data.md is the dataset schema.
"""

from ssi.data.sources import DataValidationError

__all__ = ["DataValidationError"]
