"""What a run trains (`trainable=full | new_embeddings | lora | projector`), as one object the recipe asks.

The recipe never branches on the mode: it builds the decoder, lets the choice `prepare` it (new modules),
converts the loaded weights to the prepared model's names (`model_state`), `freeze`s what is not trained,
and at each checkpoint asks for the complete weights (`merged`), for what the training state must keep
to resume (`kept_tensors`) and for files of its own (`write_files`). docs/training.md says which to choose.

- `FullTraining`: every parameter, minus those matched by `freeze=[<regex over HF names>]`.
- `FrozenBase`: the base model stays frozen and bit-identical; trained are the rows extension added
  (`new_embeddings`, ssi.model.new_rows), LoRA adapters (`lora`, ssi.model.lora), both, or nothing of the
  decoder (`projector`: the features method trains its projector only, ssi.model.methods). Its training
  state keeps only those tensors; a resume reads the base again from `model=` and checks that its weight
  files are the ones the run started from.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from safetensors.torch import save_file
from torch import nn

from ssi.files import file_sha256, write_json
from ssi.hf_dir import weight_files
from ssi.model import lora, new_rows
from ssi.model.architecture import LlamaArchitecture
from ssi.model.checkpointer import MergedWeights

MODES = ("full", "new_embeddings", "lora", "projector")
ADAPTER_DIR = "adapter"  # PEFT's adapter_config.json + adapter_model.safetensors inside each LoRA checkpoint


class TrainableError(ValueError):
    """A `trainable`, `lora.*` or `freeze` setting that cannot be applied."""


def keeps_base_frozen(mode: str) -> bool:
    """Whether `mode` trains on a frozen base read from `model=` (also when resuming)."""
    check_mode(mode)
    return mode != "full"


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise TrainableError(f"trainable must be one of {list(MODES)}, got {mode!r}")


class Trainable:
    """The interface, and its defaults: nothing added, names unchanged, everything trained."""

    mode = "full"

    def prepare(self, model: nn.Module) -> None:
        """Add or replace modules on the freshly built decoder (under its build device and dtype)."""

    def model_state(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The decoder's weights (torchtune names) in the prepared model's names, new tensors initialised."""
        return weights

    def is_trained(self, name: str) -> bool:
        return True

    def freeze(self, model: nn.Module, frozen_dtype: torch.dtype, method_trains: Callable[[str], bool]) -> None:
        """Turn off gradients of what is not trained (by this choice, or by the method: `method_trains`) and
        hold it in `frozen_dtype` (frozen weights never change, so they need no fp32 master copy when the
        file already holds them in the compute dtype)."""
        for name, param in model.named_parameters():
            trained = self.is_trained(name) or method_trains(name)
            param.requires_grad_(trained)
            if not trained:
                param.data = param.data.to(frozen_dtype)

    def merged(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The complete decoder weights (torchtune names) of the prepared model's state; `MergedWeights` where
        the model's own dtype would not hold them (ssi.model.checkpointer)."""
        return state

    def kept_tensors(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """What the training state keeps of the model to resume exactly; None: the full-training rule
        (the HF weights, plus master weights when they are more precise, ssi.train.state)."""
        return None

    def base_identity(self) -> dict[str, Any] | None:
        """The weight files a frozen base was read from (recorded, and checked on resume)."""
        return None

    def check_base(self, recorded: dict[str, Any] | None, checkpoint: Path) -> None:
        """Refuse to resume `checkpoint` on another base than the one it recorded (`base_identity`)."""

    def write_files(self, checkpoint: Path, state: dict[str, torch.Tensor]) -> None:
        """Files of this mode's own inside a checkpoint being written."""

    def describe(self, model: nn.Module) -> str:
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        return f"trainable={self.mode}: {trained:,} of {total:,} parameters trained ({100 * trained / total:.3g}%)"


class FullTraining(Trainable):
    """Every parameter, except those whose HF name a `freeze` pattern matches (re.search)."""

    def __init__(self, arch: LlamaArchitecture, patterns: list[str]) -> None:
        to_hf = arch.tune_to_hf_names()
        self.frozen: set[str] = set()
        for pattern in patterns:
            try:
                regex = re.compile(pattern)
            except re.error as err:
                raise TrainableError(f"freeze: {pattern!r} is not a regular expression ({err})") from None
            matched = {tune for tune, hf in to_hf.items() if regex.search(hf)}
            if not matched:
                example = next(iter(to_hf.values()))
                raise TrainableError(f"freeze: {pattern!r} matches no parameter (HF names, e.g. {example!r})")
            self.frozen |= matched
        if self.frozen == set(to_hf):
            raise TrainableError(f"freeze: {patterns} matches every parameter: nothing would train")

    def is_trained(self, name: str) -> bool:
        return name not in self.frozen


class FrozenBase(Trainable):
    """A frozen base with trained new rows (`rows`), LoRA adapters (`adapters`), or both."""

    def __init__(
        self,
        mode: str,
        arch: LlamaArchitecture,
        first_new: int,
        base_dir: Path,
        *,
        rows: bool,
        adapters: lora.LoraSettings | None,
        seed: int,
    ) -> None:
        self.mode = mode
        self.arch = arch
        self.first_new = first_new
        self.base_dir = base_dir
        self.rows = rows
        self.adapters = adapters
        self.seed = seed
        self._identity: dict[str, Any] | None = None

    def prepare(self, model: nn.Module) -> None:
        if self.adapters is not None:
            lora.add_lora(model, self.adapters)
        if self.rows:
            new_rows.split_rows(model, self.first_new)

    def model_state(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        state = new_rows.rows_state(weights, self.first_new) if self.rows else dict(weights)
        if self.adapters is not None:
            state |= lora.initial_adapters(self.arch, self.adapters, self.seed)
        return state

    def is_trained(self, name: str) -> bool:
        return name.endswith(f".{new_rows.NEW}") or name.endswith((f".{lora.LORA_A}", f".{lora.LORA_B}"))

    def merged(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.adapters is None:
            return new_rows.join_rows(state)
        # saved in fp32: the model's own dtype (bf16) would round the adapters' small deltas away
        return MergedWeights(new_rows.join_rows(lora.merge(state, self.adapters)), torch.float32)

    def kept_tensors(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: tensor for name, tensor in state.items() if self.is_trained(name)}

    def base_identity(self) -> dict[str, Any]:
        if self._identity is None:
            files = {path.name: file_sha256(path) for path in weight_files(self.base_dir)}
            self._identity = {"model": str(self.base_dir), "weights_sha256": files}
        return self._identity

    def check_base(self, recorded: dict[str, Any] | None, checkpoint: Path) -> None:
        """Refuse to resume on a base whose weight files are not the ones the run started from."""
        if recorded is None:
            raise TrainableError(f"{checkpoint}: its training state does not record the base model it trained on")
        now = self.base_identity()["weights_sha256"]
        for name, digest in recorded["weights_sha256"].items():
            if now.get(name) != digest:
                raise TrainableError(
                    f"resuming {checkpoint}: the base weights {self.base_dir / name} changed since the run started "
                    f"(trained on {recorded['model']}); trainable={self.mode} resumes on the same base"
                )

    def write_files(self, checkpoint: Path, state: dict[str, torch.Tensor]) -> None:
        if self.adapters is None:
            return
        rows = new_rows.trained_rows(state)
        config, tensors = lora.peft_adapter(state, self.adapters, self.arch, rows, self.first_new, str(self.base_dir))
        folder = checkpoint / ADAPTER_DIR  # inside the checkpoint's temporary folder: it appears with it
        folder.mkdir()
        write_json(folder / "adapter_config.json", config)
        save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})


def from_config(
    cfg: DictConfig, arch: LlamaArchitecture, first_new: int | None, base_dir: Path, method: str = "units"
) -> Trainable:
    """The choice `trainable` / `lora.*` / `freeze` of a run, checked (training new rows needs a model
    directory with the extension manifest: `first_new` is its first added row, None without one). The
    features method has no new rows: `projector` trains its projector alone, `lora` adds adapters to it."""
    mode = str(cfg.trainable)
    check_mode(mode)
    patterns = [str(p) for p in (cfg.get("freeze") or [])]
    if patterns and mode != "full":
        raise TrainableError(f"freeze applies to trainable=full; trainable={mode} already freezes the base model")
    if mode == "full":
        return FullTraining(arch, patterns)
    units = method == "units"
    if mode == "projector" and units:
        raise TrainableError("trainable=projector trains the features method's projector: it needs method=features")
    if mode == "new_embeddings" and not units:
        raise TrainableError(
            f"trainable=new_embeddings trains the rows of speech units; method={method} has none: use "
            "trainable=projector (the LLM frozen), lora or full"
        )
    try:
        settings = lora.LoraSettings.from_config(cfg.lora) if mode == "lora" else None
    except lora.LoraError as err:
        raise TrainableError(str(err)) from None
    # the features method has no new rows: its LLM may be a base model without the extension manifest
    rows = units and (settings.train_new_embeddings if settings is not None else True)
    if rows and first_new is None:
        raise TrainableError(
            f"trainable={mode} trains the rows added by extension, but {base_dir} has no extension manifest "
            "(ssi.json): extend the model first (scripts/extend_llama3_2.py)"
        )
    first = first_new if first_new is not None else arch.vocab_size
    return FrozenBase(mode, arch, first, base_dir, rows=rows, adapters=settings, seed=int(cfg.seed))
