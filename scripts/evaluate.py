#!/usr/bin/env python
"""Score a likelihood benchmark (sWUGGY, sBLIMP, spoken/topic StoryCloze, SALMon, BLiMP, ...) with a checkpoint.

    python scripts/evaluate.py model=runs/cpt-1b/checkpoints/epoch_0/global_step_20000 benchmark=swuggy_dev.jsonl
        [output_dir=<dir>] [backend=torch|vllm] [score=sum|mean] ...

The configuration is conf/evaluate.yaml (every default documented there); the work is ssi.eval.pipeline;
the item format, scoring and outputs are described in docs/evaluation.md.
The `__main__` guard matters: vLLM's engine starts worker processes that re-import this file.
"""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from ssi.eval.pipeline import main as evaluate
from ssi.overrides import exit_on_bad_overrides


@hydra.main(version_base=None, config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    sys.exit(evaluate(cfg))


if __name__ == "__main__":
    exit_on_bad_overrides("evaluate", Path(__file__).resolve().parents[1] / "conf")
    main()
