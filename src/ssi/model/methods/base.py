"""The interface every integration method implements, and its defaults (the units method's behaviour).

A method owns what the decoder reads besides its token embeddings. The recipe asks it to add its modules to
the freshly built decoder (`attach`), to add its tensors to the weights being loaded (`model_state`), which
of them it trains (`is_trained`), to take them out of the decoder's state before the HF directory is written
(`split_state`) and to write them beside it (`write_files`); before each forward it turns a batch into the
decoder's token input (`decoder_inputs`). Generation asks it for prompt embeddings (`prompt_embeddings`) when
the prompts are more than token ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ssi.hf_dir import METHOD_MANIFEST

METHODS = ("units", "features")
METHOD_FILE = METHOD_MANIFEST  # in every checkpoint of a run whose method writes files of its own


class MethodError(ValueError):
    """A `method`, `speech_encoder.*` or `projector.*` setting, or a checkpoint's method files, that cannot be used."""


def check_method(name: str, kind: str) -> None:
    if name not in METHODS:
        raise MethodError(f"method must be one of {list(METHODS)}, got {name!r}")
    if name != "units" and kind != "sft":
        raise MethodError(f"method={name} trains ASR (recipes/sft.py); the {kind} recipe trains discrete units only")


class SpeechMethod:
    """The interface; its defaults add nothing and read token ids, which is all the units method needs."""

    name = "units"
    audio_slots: Any = None  # ssi.data.audio_sft.AudioSlots of a method that reads audio

    def attach(self, model: nn.Module) -> None:
        """Add this method's modules to the decoder (called under the decoder's build device and dtype)."""

    def model_state(self, weights: dict[str, torch.Tensor], checkpoint: Path | None) -> dict[str, torch.Tensor]:
        """The decoder's weights plus this method's tensors: those of `checkpoint` (the one resumed, or the
        model a run starts from) when it has them, else start values."""
        return weights

    def is_trained(self, name: str) -> bool:
        """Whether the parameter `name` is one of this method's trained ones (whatever `trainable` says)."""
        return False

    def split_state(self, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(the decoder's tensors, this method's own) of a full model state."""
        return state, {}

    def decoder_inputs(self, batch: dict[str, Any], device: torch.device) -> torch.Tensor:
        """The token ids the decoder's forward is called with (on `device`)."""
        return batch["tokens"].to(device, non_blocking=True)

    def prompt_embeddings(
        self, prompts: Sequence[list[int]], audio: Sequence[Any], model_dir: Path, device: torch.device
    ) -> list[torch.Tensor] | None:
        """Generation: each prompt's input embeddings when its token ids do not say everything (None: they do)."""
        return None

    def write_files(self, checkpoint: Path, own: dict[str, torch.Tensor]) -> None:
        """This method's files inside a checkpoint being written (its temporary folder)."""

    def record(self) -> dict[str, Any]:
        """What generation_config.yaml and the report say about the method."""
        return {"method": self.name}

    def describe(self) -> str:
        return f"method={self.name}"


class UnitsMethod(SpeechMethod):
    """Discrete units in an extended vocabulary (ssi.vocab): speech arrives as token ids, nothing is added."""
