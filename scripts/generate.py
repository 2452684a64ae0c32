#!/usr/bin/env python
"""Transcribe a split with a speech-extended checkpoint (vLLM or PyTorch) and score the WER.

    python scripts/generate.py model=runs/sft-1b/checkpoints/epoch_0/global_step_5000 [data=sft/<preset>]
        [gen.split=test] [backend=vllm|torch] [gen.output_dir=...] [sampling_params.max_tokens=...] ...

The configuration is conf/generate.yaml (every default documented there); the work is ssi.generate.
The `__main__` guard matters: vLLM's engine starts worker processes that re-import this file.
"""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from ssi.generate.pipeline import main as generate
from ssi.overrides import exit_on_bad_overrides


@hydra.main(version_base=None, config_path="../conf", config_name="generate")
def main(cfg: DictConfig) -> None:
    sys.exit(generate(cfg))


if __name__ == "__main__":
    exit_on_bad_overrides("generate", Path(__file__).resolve().parents[1] / "conf")
    main()
