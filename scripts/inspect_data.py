#!/usr/bin/env python
"""Print exactly what the model will see for a data preset: formatted examples, masks and statistics.

    python scripts/inspect_data.py model=<speech-extended model> data=cpt/mls_hubert_large_l22 \
        data.train.dataset.n_samples=200 [split=dev] [n_examples=5] [inference=true]

Same Hydra data config as the recipes (conf/inspect_data.yaml documents the extra keys).
"""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from ssi import report_error
from ssi.config import MissingSettingError, required, to_container
from ssi.data.sources import DataValidationError
from ssi.data.stats import inspection_report
from ssi.overrides import exit_on_bad_overrides
from ssi.run_dir import RunDirError, model_or_final_checkpoint
from ssi.vocab.layout import VocabError
from ssi.vocab.tiktoken import load_tokenizer


@hydra.main(version_base="1.3", config_path="../conf", config_name="inspect_data")
def main(cfg: DictConfig) -> None:
    try:
        if cfg.model_dir is not None:
            raise MissingSettingError(f"model_dir= is now model=: pass model={cfg.model_dir}")
        tokenizer = load_tokenizer(model_or_final_checkpoint(required(cfg, "model")))
        print(inspection_report(to_container(cfg), tokenizer))
    except (DataValidationError, VocabError, MissingSettingError, FileNotFoundError, RunDirError) as err:
        sys.exit(report_error(err))


if __name__ == "__main__":
    exit_on_bad_overrides("inspect_data", Path(__file__).resolve().parents[1] / "conf")
    main()
