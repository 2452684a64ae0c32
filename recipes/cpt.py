#!/usr/bin/env python
"""Continued pre-training (CPT) of a speech-extended Llama: a thin Hydra entry point.

    python recipes/cpt.py data=cpt/<preset> output_dir=RUN model=MODEL [key=value ...]
    torchrun --nproc_per_node 8 recipes/cpt.py ...      # or: srun python recipes/cpt.py ...

The configuration is conf/cpt.yaml (every default documented there); the loop is ssi.train.recipe.
"""

import sys

import hydra
from omegaconf import DictConfig

from ssi.train.recipe import run_recipe


@hydra.main(version_base=None, config_path="../conf", config_name="cpt")
def main(cfg: DictConfig) -> None:
    sys.exit(run_recipe(cfg, "cpt"))


if __name__ == "__main__":
    main()
