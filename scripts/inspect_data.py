#!/usr/bin/env python
"""Print exactly what the model will see for a data preset: formatted examples, masks and statistics.

    python scripts/inspect_data.py model=<speech-extended model> data=cpt/mls_hubert_large_l22 \
        data.train.dataset.n_samples=200 [split=dev] [n_examples=5] [inference=true]
    python scripts/inspect_data.py model=<Llama 3 dir> data=sft/audio_folder data.train.dataset.source=<folder> \
        speech_encoder.model=<encoder dir> [speech_encoder.layer=22] [projector.downsample=5]

Same Hydra data config as the recipes (conf/inspect_data.yaml documents the extra keys).
"""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from ssi import report_error
from ssi.config import MissingSettingError, required, to_container
from ssi.data.audio_inspection import audio_inspection_report
from ssi.data.config import data_input
from ssi.data.sources import DataValidationError
from ssi.data.stats import inspection_report
from ssi.hf_dir import MANIFEST_NAME
from ssi.model.methods import MethodError
from ssi.model.methods.features import FeatureSettings, FeaturesMethod
from ssi.overrides import exit_on_bad_overrides
from ssi.run_dir import RunDirError, model_or_final_checkpoint
from ssi.vocab.layout import SpeechVocab, VocabError
from ssi.vocab.tiktoken import load_tokenizer, model_tokenizer


@hydra.main(version_base="1.3", config_path="../conf", config_name="inspect_data")
def main(cfg: DictConfig) -> None:
    try:
        if cfg.model_dir is not None:
            raise MissingSettingError(f"model_dir= is now model=: pass model={cfg.model_dir}")
        model = model_or_final_checkpoint(required(cfg, "model"))
        if data_input(cfg.data) == "audio":  # the features method: a base Llama and the encoder that sizes the spans
            method = FeaturesMethod(FeatureSettings.from_config(cfg), llm_dim=1)
            tokenizer = model_tokenizer(model, SpeechVocab.load(model) if (model / MANIFEST_NAME).is_file() else None)
            print(audio_inspection_report(to_container(cfg), tokenizer, method.audio_slots))
        else:
            print(inspection_report(to_container(cfg), load_tokenizer(model)))
    except (DataValidationError, VocabError, MissingSettingError, FileNotFoundError, RunDirError, MethodError) as err:
        sys.exit(report_error(err))


if __name__ == "__main__":
    exit_on_bad_overrides("inspect_data", Path(__file__).resolve().parents[1] / "conf")
    main()
