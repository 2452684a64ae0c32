"""The prompts of a split, built by the same data pipeline the model was trained with.

A checkpoint written by the recipes sits in a run whose `torchtune_config.yaml` holds the whole data
preset it was trained on (sources, column names, dedup, modality tokens, instruction format), so the
prompts are built exactly as in training unless `data=sft/<preset>` names another preset.
`dataset_name_from_source` names the output folder after the split's source, because the run config
records the resolved preset but not the preset's file name, and the source is what identifies the data.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue
from tqdm import tqdm

from ssi.config import resolve_present
from ssi.data.config import SPLITS, build_dataset, section_source
from ssi.generate import GenerationError
from ssi.model.speech_encoder import AudioSlots
from ssi.run_dir import CONFIG_FILE, CheckpointLocation
from ssi.vocab.tiktoken import SpeechLlama3Tokenizer

_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class Prompt:
    """One SFT inference example: the prompt ends with the assistant header; an audio example (the features
    method) has its waveform and `AUDIO_SLOT` ids where its projected features go."""

    id: str
    reference: str
    token_ids: list[int]
    audio: Any = None


def dataset_name_from_source(source: str) -> str:
    """A stable folder name for a data source: `owner/name` hub ids give `name`; local paths their last
    component without glob characters, `{split}` placeholders or a jsonl/parquet suffix."""
    parts = [p for p in re.split(r"[\\/]+", str(source)) if p and p not in (".", "..")]
    clean = [p for p in parts if not any(c in p for c in "*?[]{}")]
    if not clean:
        raise GenerationError(f"cannot derive a dataset name from source {source!r}: set gen.dataset_name")
    name = re.sub(r"\.(jsonl|json|parquet)$", "", clean[-1])
    name = _UNSAFE_NAME.sub("_", name).strip("._")
    if not name:
        raise GenerationError(f"cannot derive a dataset name from source {source!r}: set gen.dataset_name")
    return name


def preset_splits(data: Mapping[str, Any]) -> dict[str, str]:
    """`{section: split}` of the sections a preset has and can read (one set to null has been removed; one whose
    source is left `???`, as a test-only command leaves the training source, is left out); the split names the
    data the section reads (`train_heldout_0.05` for a dev section held out of train)."""
    splits = {}
    for section in SPLITS:
        if data.get(section) is None:
            continue
        try:
            splits[section] = section_source(data, section).split
        except MissingMandatoryValue:
            continue
    return splits


def resolve_split(data: Mapping[str, Any], split: str) -> tuple[str, str]:
    """(preset section, dataset split name) for `gen.split`: a preset section (`train`, `dev`, `test`) or the
    dataset split one of the sections reads (`validation`, ...). Anything else is refused, never read from
    another section: the output folder is named after the split, so it must be the data that was read."""
    sections = preset_splits(data)
    if split in sections:
        return split, sections[split]
    for section in ("test", "dev", "train"):
        if sections.get(section) == split:
            return section, split
    listed = ", ".join(f"{section} (split {name!r} of {section_source(data, section).spec.source})"
                       for section, name in sections.items())  # fmt: skip
    missing = f"the preset has no {split} section" if split in SPLITS else f"no section of the preset reads {split!r}"
    raise GenerationError(
        f"gen.split={split}: {missing}; its splits are {listed}. To read another split of a source, set "
        f"data.<section>.dataset.split=<name> (e.g. +data.test.dataset.split={split} with gen.split={split})"
    )


def resolve_data_config(cfg: DictConfig, location: CheckpointLocation, model_dir: Path) -> tuple[DictConfig, str]:
    """The data preset to build prompts from, and where it came from (for generation_config.yaml).

    `data=sft/<preset>` (a complete preset, it has `kind`) is used as given; otherwise the run's
    training preset, with any `+data.<key>=value` overrides merged on top."""
    given = cfg.get("data")
    if given is not None and "kind" in given:
        try:
            return OmegaConf.create(resolve_present(given)), "command line (data=<preset>)"
        except InterpolationResolutionError as err:  # e.g. paired_folder's ${method}, a training setting
            raise GenerationError(
                f"data: {err.full_key} = {err.msg}; generation does not read training settings: give the value, "
                "or +<setting>=<value> for the one the preset names"
            ) from None
    if location.run_config is None:
        raise GenerationError(
            f"{model_dir} is not a checkpoint inside a run directory (<run>/checkpoints/epoch_E/global_step_S "
            f"with <run>/{CONFIG_FILE}), so there is no training data preset to read: "
            "give data=sft/<preset> and gen.output_dir=<dir>"
        )
    run_cfg = OmegaConf.load(location.run_config)
    if "data" not in run_cfg:
        raise GenerationError(f"{location.run_config} has no 'data' section")
    data = run_cfg.data
    source = str(location.run_config)
    if given is not None:
        data = OmegaConf.merge(data, given)
        source += " + command-line data overrides"
    return OmegaConf.create(resolve_present(data)), source


def build_prompts(
    data: DictConfig,
    section: str,
    split_name: str,
    tokenizer: SpeechLlama3Tokenizer,
    progress: bool,
    audio_slots: AudioSlots | None = None,
) -> list[Prompt]:
    """The split's SFT inference prompts through the training data pipeline (same validation, dedup and
    chat format as in training), in split order; duplicate ids are refused since scoring matches by id."""
    if data.get("kind") != "sft":
        raise GenerationError(
            f"generation needs an SFT data preset (ASR prompts), got kind={data.get('kind')!r}: pass data=sft/<preset>"
        )
    data = data.copy()
    data[section].dataset.split = split_name
    built = build_dataset(data, section, tokenizer, inference=True, audio_slots=audio_slots)
    prompts, first_seen = [], {}
    for index in tqdm(range(len(built.dataset)), desc="building prompts", disable=not progress):
        example = built.dataset[index]
        sample_id = example["id"]
        if sample_id in first_seen:
            raise GenerationError(
                f"{data[section].dataset.source}[{split_name}]: duplicate id {sample_id!r} "
                f"(rows {first_seen[sample_id]} and {index}); generations are matched to references by id"
            )
        first_seen[sample_id] = index
        prompts.append(Prompt(sample_id, example["reference"], list(example["tokens"]), example.get("audio")))
    return prompts
