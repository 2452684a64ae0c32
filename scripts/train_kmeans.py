#!/usr/bin/env python
"""Fit k-means centroids on one layer of a HuBERT-like model over a sample of a corpus, for scripts/encode_audio.py.

    python scripts/train_kmeans.py encoder=hubert_large_ll60k_layer22 k=500 source=<audio dataset> split=train \
        sample.hours=10 output=models/kmeans/hubert_large_l22_k500.safetensors [encoder.layer=...] [device=cuda]

conf/train_kmeans.yaml documents every key; docs/encoding.md shows the encoder preset that uses the file.
"""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from ssi.encode.kmeans_training import train_kmeans
from ssi.encode.settings import run_cli
from ssi.overrides import exit_on_bad_overrides


@hydra.main(version_base="1.3", config_path="../conf", config_name="train_kmeans")
def main(cfg: DictConfig) -> None:
    sys.exit(run_cli(train_kmeans, cfg))


if __name__ == "__main__":
    exit_on_bad_overrides("train_kmeans", Path(__file__).resolve().parents[1] / "conf")
    main()
