"""Which method a run trains with (`method=`) or a checkpoint was trained with (its speech_method.json)."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from ssi.model.methods.base import METHOD_FILE, MethodError, SpeechMethod, UnitsMethod
from ssi.model.methods.features import FeatureSettings, FeaturesMethod, read_manifest


def needs_extension(name: str) -> bool:
    """Whether method `name` reads a speech-extended LLM directory (ssi.json) or any Llama 3 directory."""
    return name == "units"


def data_input(name: str) -> str:
    """What the data presets of method `name` hold (`data.input`)."""
    return "audio" if name == "features" else "units"


def from_config(cfg: DictConfig, llm_dim: int, compute_dtype: torch.dtype = torch.float32) -> SpeechMethod:
    name = str(cfg.get("method", "units"))
    if name == "units":
        return UnitsMethod()
    if name == "features":
        return FeaturesMethod(
            FeatureSettings.from_config(cfg), llm_dim, seed=int(cfg.get("seed", 0)), compute_dtype=compute_dtype
        )
    raise MethodError(f"method must be units or features, got {name!r}")


def from_checkpoint(model_dir: Path) -> SpeechMethod:
    """The method of a checkpoint: none recorded is the units method (every checkpoint before features)."""
    manifest = read_manifest(model_dir)
    if manifest is None:
        return UnitsMethod()
    if manifest.get("method") != "features":
        raise MethodError(f"{model_dir / METHOD_FILE}: unknown method {manifest.get('method')!r}")
    return FeaturesMethod.from_checkpoint(model_dir, manifest)
