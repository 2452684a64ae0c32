#!/usr/bin/env python
"""Encode an audio dataset into discrete speech units that the data presets, recipes and generate.py read.

    python scripts/encode_audio.py encoder=hubert_large_ll60k_layer22 encoder.kmeans=<file> source=<audio dataset> \
        output_dir=<dir> [split=test] [columns.text=transcript] [shard=0 num_shards=8] [device=cuda dtype=bf16]

conf/encode_audio.yaml documents every key; docs/encoding.md the output, the manifest and sharding.
"""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from ssi.encode.pipeline import encode_audio
from ssi.encode.settings import run_cli
from ssi.overrides import exit_on_bad_overrides


@hydra.main(version_base="1.3", config_path="../conf", config_name="encode_audio")
def main(cfg: DictConfig) -> None:
    sys.exit(run_cli(encode_audio, cfg))


if __name__ == "__main__":
    exit_on_bad_overrides("encode_audio", Path(__file__).resolve().parents[1] / "conf")
    main()
