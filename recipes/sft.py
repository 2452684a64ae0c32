#!/usr/bin/env python
"""Supervised fine-tuning (SFT) of a speech-extended Llama for ASR: a thin Hydra entry point.

    python recipes/sft.py data=sft/<preset> output_dir=RUN model=MODEL [key=value ...]
    torchrun --nproc_per_node 8 recipes/sft.py ...      # or: srun python recipes/sft.py ...
    python recipes/sft.py -m hydra.sweep.dir=ROOT key=a,b ...   # a sweep, one run per cell (docs/experiments.md)

The configuration is conf/sft.yaml (every default documented there); the loop is ssi.train.recipe.
"""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from ssi.overrides import exit_on_bad_overrides
from ssi.train.recipe import run_recipe
from ssi.train.sweep import end_job


@hydra.main(version_base=None, config_path="../conf", config_name="sft")
def main(cfg: DictConfig) -> None:
    end_job(run_recipe(cfg, "sft"), "sft")


if __name__ == "__main__":
    exit_on_bad_overrides("sft", Path(__file__).resolve().parents[1] / "conf")
    main()
