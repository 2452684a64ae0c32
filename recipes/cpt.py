#!/usr/bin/env python
"""Continued pre-training (CPT) of a speech-extended Llama: a thin Hydra entry point.

    python recipes/cpt.py data=cpt/<preset> output_dir=RUN model=MODEL [key=value ...]
    torchrun --nproc_per_node 8 recipes/cpt.py ...      # or: srun python recipes/cpt.py ...
    python recipes/cpt.py -m hydra.sweep.dir=ROOT key=a,b ...   # a sweep, one run per cell (docs/experiments.md)

The configuration is conf/cpt.yaml (every default documented there); the loop is ssi.train.recipe.
"""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from ssi.overrides import exit_on_bad_overrides
from ssi.train.recipe import run_recipe
from ssi.train.sweep import end_job


@hydra.main(version_base=None, config_path="../conf", config_name="cpt")
def main(cfg: DictConfig) -> None:
    end_job(run_recipe(cfg, "cpt"), "cpt")


if __name__ == "__main__":
    exit_on_bad_overrides("cpt", Path(__file__).resolve().parents[1] / "conf")
    main()
