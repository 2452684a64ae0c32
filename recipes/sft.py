#!/usr/bin/env python
"""Supervised fine-tuning (SFT) of a speech-extended Llama for ASR: a thin Hydra entry point.

    python recipes/sft.py data=sft/<preset> output_dir=RUN model=MODEL [key=value ...]
    torchrun --nproc_per_node 8 recipes/sft.py ...      # or: srun python recipes/sft.py ...

The configuration is conf/sft.yaml (every default documented there); the loop is ssi.train.recipe.
"""

import sys

import hydra
from omegaconf import DictConfig

from ssi.train.recipe import run_recipe


@hydra.main(version_base=None, config_path="../conf", config_name="sft")
def main(cfg: DictConfig) -> None:
    sys.exit(run_recipe(cfg, "sft"))


if __name__ == "__main__":
    main()
