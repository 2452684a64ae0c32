#!/usr/bin/env python
"""Print exactly what the model will see for a data preset: formatted examples, masks and statistics.

    python scripts/inspect_data.py model_dir=<speech-extended model> data=cpt/mls_hubert_large_l22 \
        data.train.dataset.n_samples=200 [split=dev] [n_examples=5] [inference=true]

Same Hydra data config as the recipes (conf/inspect_data.yaml documents the extra keys).
"""

import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from ssi.data.sources import DataValidationError
from ssi.data.stats import inspection_report
from ssi.tokenizer import load_tokenizer
from ssi.tokens import VocabError


@hydra.main(version_base="1.3", config_path="../conf", config_name="inspect_data")
def main(cfg: DictConfig) -> None:
    try:
        tokenizer = load_tokenizer(cfg.model_dir)
        print(inspection_report(OmegaConf.to_container(cfg, resolve=True), tokenizer))
    except (DataValidationError, VocabError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
