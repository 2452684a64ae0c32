"""Continuous speech features through a trained projector (SLAM-ASR, arXiv 2402.08846; docs/features.md).

A speech encoder (ssi.model.speech_encoder, frozen unless `speech_encoder.trainable`) gives features at one
layer; `FrameStackProjector` stacks and projects them into the LLM's hidden size. In the prompt, an
utterance's audio span is a run of `AUDIO_SLOT` positions (ssi.data.audio_sft), one per projector output: a
pre-hook on the decoder's token embedding takes the slots out of the lookup and a hook writes the projected
features into them. Both run inside the decoder's forward, so FSDP has gathered the projector (a submodule
of the decoder, `speech_projector`) when they do. Generation builds the same embeddings from the
checkpoint's embedding table (`prompt_embeddings`) and hands them to vLLM or the torch backend.

Each checkpoint holds `speech_projector.safetensors` (fp32), `speech_encoder.safetensors` when the encoder
was trained in this run or an earlier stage (a later stage keeps the encoder its start checkpoint used, frozen
or trained on), and `speech_method.json`: the encoder (what `speech_encoder.model` named, the folder it was
read from, the hub revision, the sha256 of every weight file), its layer, rates, the projector's shape and
the compute dtype training ran the encoder and projector in (generation runs them in it too). A checkpoint
whose encoder files changed since training is refused, naming the file.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from ssi.dtypes import DtypeError, parse_dtype, short_name
from ssi.files import file_sha256, read_json, write_json
from ssi.hf_dir import INPUT_EMBEDDING, SAFETENSORS_INDEX, SAFETENSORS_SINGLE, read_safetensors_header, read_tensor
from ssi.locations import hub_failure_message, looks_local, missing_path_message
from ssi.model.methods.base import METHOD_FILE, MethodError, SpeechMethod
from ssi.model.projector import FrameStackProjector
from ssi.model.speech_encoder import AudioSlots, SpeechEncoder, SpeechEncoderError
from ssi.vocab.tiktoken import AUDIO_SLOT

PROJECTOR, ENCODER = "speech_projector", "speech_encoder"  # the modules' names on the decoder
PROJECTOR_FILE = "speech_projector.safetensors"
ENCODER_FILE = "speech_encoder.safetensors"  # only when the encoder was trained (in this run or a start checkpoint)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_ENCODE_BATCH = 16  # utterances per encoder call when building generation prompts

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FeatureSettings:
    """The `speech_encoder` and `projector` sections of a run."""

    encoder: str
    layer: int = -1
    encoder_trainable: bool = False
    revision: str | None = None
    downsample: int = 5
    hidden: int = 2048

    @classmethod
    def from_config(cls, cfg: DictConfig) -> FeatureSettings:
        enc, proj = cfg.get("speech_encoder"), cfg.get("projector")
        if enc is None or enc.get("model") in (None, "", "???"):
            raise MethodError("method=features needs speech_encoder.model=<transformers audio encoder dir or hub id>")
        if proj is None:
            raise MethodError("method=features needs the projector section (projector.downsample, projector.hidden)")
        settings = cls(
            encoder=str(enc.model),
            layer=int(enc.get("layer", -1)),
            encoder_trainable=bool(enc.get("trainable", False)),
            revision=None if enc.get("revision") is None else str(enc.revision),
            downsample=int(proj.downsample),
            hidden=int(proj.hidden),
        )
        if settings.downsample < 1 or settings.hidden < 1:
            raise MethodError(
                f"projector.downsample and projector.hidden must be >= 1, got {settings.downsample}, {settings.hidden}"
            )
        return settings


def encoder_dir(spec: str, revision: str | None) -> tuple[Path, str | None]:
    """The local folder of `speech_encoder.model` (a directory, or a hub id fetched into the HF cache) and
    the hub commit it holds (None for a local directory)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path, None
    if looks_local(spec):
        raise MethodError(missing_path_message("speech_encoder.model", spec))
    from huggingface_hub import snapshot_download

    try:
        folder = Path(
            snapshot_download(spec, revision=revision, allow_patterns=["*.json", *(f"*{s}" for s in _WEIGHT_SUFFIXES)])
        )
    except Exception as err:  # the hub client raises many types (offline, gated, unknown revision)
        raise MethodError(hub_failure_message("speech_encoder.model", spec, err)) from None
    return folder, folder.name  # snapshots are named after the commit


def weights_sha256(folder: Path) -> dict[str, str]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)
    if not files:
        raise MethodError(f"speech_encoder.model={folder}: no weight files ({', '.join(_WEIGHT_SUFFIXES)})")
    return {p.name: file_sha256(p) for p in files}


def initial_projector(in_dim: int, out_dim: int, downsample: int, hidden: int, seed: int) -> dict[str, torch.Tensor]:
    """fp32 starting weights, drawn on the CPU from `seed` as nn.Linear draws them (uniform in +-1/sqrt(fan_in)),
    so every rank and every world size starts alike."""
    generator = torch.Generator().manual_seed(seed + 7)
    state = {}
    for name, fan_in, fan_out in (("linear1", in_dim * downsample, hidden), ("linear2", hidden, out_dim)):
        bound = 1 / math.sqrt(fan_in)
        state[f"{name}.weight"] = torch.empty(fan_out, fan_in).uniform_(-bound, bound, generator=generator)
        state[f"{name}.bias"] = torch.empty(fan_out).uniform_(-bound, bound, generator=generator)
    return state


class FeaturesMethod(SpeechMethod):
    """A speech encoder's features through a trained frame-stacking projector into the LLM's input embeddings."""

    name = "features"

    def __init__(
        self,
        settings: FeatureSettings,
        llm_dim: int,
        *,
        seed: int = 0,
        compute_dtype: torch.dtype = torch.float32,
        recorded: dict[str, Any] | None = None,
    ) -> None:
        self.settings = settings
        self.llm_dim = llm_dim
        self.seed = seed
        self.compute_dtype = compute_dtype
        folder, revision = encoder_dir(settings.encoder, settings.revision)
        self.identity = {
            "model": settings.encoder,
            "path": str(folder.resolve()),
            "revision": revision,
            "weights_sha256": weights_sha256(folder),
        }
        if recorded is not None:
            check_encoder(recorded, self.identity)
        try:
            self.encoder = SpeechEncoder(folder, settings.layer)
        except SpeechEncoderError as err:
            raise MethodError(str(err)) from None
        self.encoder.requires_grad_(settings.encoder_trainable)
        self.encoder.train(settings.encoder_trainable)
        self.audio_slots = AudioSlots(self.encoder.n_frames, settings.downsample, self.encoder.sampling_rate)
        # the encoder's weights are not the source folder's: trained here or in the checkpoint a stage starts from
        self.carries_encoder = settings.encoder_trainable
        self.projector: FrameStackProjector | None = None
        self._waves: Sequence[np.ndarray] | None = None
        self._slot_mask: torch.Tensor | None = None

    def new_projector(self) -> FrameStackProjector:
        s = self.settings
        return FrameStackProjector(self.encoder.dim, self.llm_dim, s.downsample, s.hidden)

    # --- training ----------------------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        self.projector = self.new_projector()
        model.add_module(PROJECTOR, self.projector)
        if self.settings.encoder_trainable:
            # master weights in the model's parameter dtype (fp32, or bf16 with mixed_precision=false), like
            # every other trained parameter: FSDP2 and the recipe's dtype check need one dtype
            self.encoder.to(torch.get_default_dtype())
            model.add_module(ENCODER, self.encoder)
        model.tok_embeddings.register_forward_pre_hook(self._take_slots)
        model.tok_embeddings.register_forward_hook(self._fill_slots)

    def model_state(self, weights: dict[str, torch.Tensor], checkpoint: Path | None) -> dict[str, torch.Tensor]:
        """A checkpoint of this method (resumed, or `model=` of a later stage) gives its projector, and the
        encoder it carries (trained there or before), after checking they fit this run; anything else starts
        afresh. A carried encoder is used whether this run trains it or not: the projector was trained on its
        features, and this run's checkpoints carry it on."""
        s = self.settings
        saved = read_manifest(checkpoint) if checkpoint is not None else None
        if saved is None:
            projector = initial_projector(self.encoder.dim, self.llm_dim, s.downsample, s.hidden, self.seed)
        else:
            assert checkpoint is not None
            self._check_continues(saved, checkpoint)
            projector = _read(checkpoint / PROJECTOR_FILE)
            if carries_encoder(saved):
                self.encoder.load_state_dict(_read(checkpoint / ENCODER_FILE))
                self.carries_encoder = True
                log.info("speech encoder: the weights %s carries (%s)", checkpoint / ENCODER_FILE, self._state())
        state = weights | {f"{PROJECTOR}.{k}": v for k, v in projector.items()}
        if s.encoder_trainable:
            state |= {f"{ENCODER}.{k}": v for k, v in self.encoder.state_dict().items()}
        return state

    def _state(self) -> str:
        return "trained on" if self.settings.encoder_trainable else "frozen"

    def _check_continues(self, saved: dict[str, Any], checkpoint: Path) -> None:
        """Refuse to continue from a checkpoint made with another encoder or another projector shape."""
        try:
            check_encoder({**saved["speech_encoder"], "checkpoint": str(checkpoint)}, self.identity)
            same_layer = saved["speech_encoder"]["layer"] == self.settings.layer
            recorded = saved["projector"]
        except (KeyError, TypeError) as err:
            raise MethodError(f"{checkpoint / METHOD_FILE}: missing or malformed entry {err}") from None
        wanted = self.manifest()["projector"]
        if recorded != wanted or not same_layer:
            raise MethodError(
                f"{checkpoint} was trained with speech_encoder.layer={saved['speech_encoder']['layer']} and projector "
                f"{recorded}; this run has layer {self.settings.layer} and {wanted}: set them as they were trained"
            )

    def is_trained(self, name: str) -> bool:
        return name.startswith(f"{PROJECTOR}.") or (self.settings.encoder_trainable and name.startswith(f"{ENCODER}."))

    def split_state(self, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        own_prefixes = (f"{PROJECTOR}.", f"{ENCODER}.")
        own = {k: v for k, v in state.items() if k.startswith(own_prefixes)}
        return {k: v for k, v in state.items() if k not in own}, own

    def decoder_inputs(self, batch: dict[str, Any], device: torch.device) -> torch.Tensor:
        self._waves = batch.get("audio")
        return batch["tokens"].to(device, non_blocking=True)

    def _take_slots(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        tokens = args[0]
        slots = tokens == AUDIO_SLOT
        if not bool(slots.any()):
            self._slot_mask = None
            return None
        self._slot_mask = slots
        return (tokens.masked_fill(slots, 0), *args[1:])

    def _fill_slots(self, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
        slots, self._slot_mask = self._slot_mask, None
        waves, self._waves = self._waves, None
        if slots is None:
            return None
        if waves is None:
            raise RuntimeError("the batch has audio slots but no audio: decoder_inputs was not called with it")
        embeds = torch.cat(self.project(waves, output.device)).to(output.dtype)
        if embeds.shape[0] != int(slots.sum()):
            raise RuntimeError(f"{int(slots.sum())} audio slots in the batch but {embeds.shape[0]} projected frames")
        return output.masked_scatter(slots.unsqueeze(-1), embeds)

    def project(self, waves: Sequence[np.ndarray], device: torch.device) -> list[torch.Tensor]:
        """One (slots, llm_dim) tensor per waveform: encoder features at the layer, stacked and projected.
        A batch is padded with zero frames, which is what each utterance's own last group is padded with.
        Encoder and projector run under the compute dtype's autocast, in training (where FSDP may also hand
        them low-precision parameters) and in generation alike, so both compute the same features."""
        assert self.projector is not None, "attach() or from_checkpoint() first"
        self.encoder.to(device)
        trained = self.settings.encoder_trainable and torch.is_grad_enabled()
        low = self.compute_dtype != torch.float32
        with torch.autocast(device.type, self.compute_dtype, enabled=low):
            with torch.set_grad_enabled(trained):
                features = self.encoder(waves)
            padded = pad_sequence(features, batch_first=True)
            projected = self.projector(padded.to(self.projector.linear1.weight.dtype))
        return [projected[i, : math.ceil(len(f) / self.settings.downsample)] for i, f in enumerate(features)]

    def write_files(self, checkpoint: Path, own: dict[str, torch.Tensor]) -> None:
        if self.carries_encoder and not self.settings.encoder_trainable:  # frozen here, carried on from the start
            own = own | {f"{ENCODER}.{k}": v for k, v in self.encoder.state_dict().items()}
        for prefix, filename in ((PROJECTOR, PROJECTOR_FILE), (ENCODER, ENCODER_FILE)):
            tensors = {k.removeprefix(f"{prefix}."): v for k, v in own.items() if k.startswith(f"{prefix}.")}
            if tensors:
                tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
                save_file(tensors, str(checkpoint / filename), metadata={"format": "pt"})
        write_json(checkpoint / METHOD_FILE, self.manifest())
        single = checkpoint / SAFETENSORS_SINGLE
        if single.is_file() and not (checkpoint / SAFETENSORS_INDEX).exists():
            # vLLM loads every *.safetensors of a folder without an index, the projector's too: name the LLM's
            entries, _ = read_safetensors_header(single)
            weight_map = {entry.name: SAFETENSORS_SINGLE for entry in entries}
            write_json(
                checkpoint / SAFETENSORS_INDEX,
                {"metadata": {"total_size": single.stat().st_size}, "weight_map": weight_map},
            )

    # --- what a checkpoint records ------------------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        s, enc = self.settings, self.encoder
        return {
            "method": self.name,
            "speech_encoder": {
                **self.identity,
                "model_type": enc.model_type,
                "layer": s.layer,
                "trainable": s.encoder_trainable,
                "weights_file": ENCODER_FILE if self.carries_encoder else None,
                "sampling_rate": enc.sampling_rate,
                "frame_rate": enc.frame_rate,
                "dim": enc.dim,
            },
            "projector": {"downsample": s.downsample, "hidden": s.hidden, "in_dim": enc.dim, "out_dim": self.llm_dim},
            "audio_slot": AUDIO_SLOT,
            "compute_dtype": short_name(self.compute_dtype),
        }

    def record(self) -> dict[str, Any]:
        s = self.settings
        return {
            "method": self.name,
            "speech_encoder": s.encoder,
            "layer": s.layer,
            "downsample": s.downsample,
            "feature_dtype": short_name(self.compute_dtype),
        }

    def describe(self) -> str:
        s = self.settings
        state = "trained" if s.encoder_trainable else "frozen"
        weights = ", fine-tuned weights" if self.carries_encoder else ""
        drop = ", layer drop off" if self.encoder.layer_drop_off else ""
        return (
            f"method=features: {self.encoder.model_type} layer {s.layer} ({state}{weights}{drop}, "
            f"{self.encoder.frame_rate:g} Hz, dim {self.encoder.dim}) -> stack {s.downsample} -> MLP {s.hidden} -> "
            f"{self.llm_dim}, computed in {short_name(self.compute_dtype)}"
        )

    # --- generation --------------------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, checkpoint: Path, manifest: dict[str, Any]) -> FeaturesMethod:
        """The method a checkpoint was trained with, its encoder checked against the recorded files."""
        try:
            enc, proj = manifest["speech_encoder"], manifest["projector"]
            settings = FeatureSettings(
                encoder=str(enc["model"]),
                layer=int(enc["layer"]),
                encoder_trainable=bool(enc["trainable"]),
                revision=enc.get("revision"),
                downsample=int(proj["downsample"]),
                hidden=int(proj["hidden"]),
            )
            llm_dim = int(proj["out_dim"])
            # what training computed the features in; checkpoints written before it was recorded ran fp32 here
            compute_dtype = parse_dtype(
                manifest.get("compute_dtype", "fp32"), f"{checkpoint / METHOD_FILE} compute_dtype"
            )
        except (KeyError, TypeError, ValueError, DtypeError) as err:
            raise MethodError(f"{checkpoint / METHOD_FILE}: missing or malformed entry {err}") from None
        method = cls(settings, llm_dim, compute_dtype=compute_dtype, recorded={**enc, "checkpoint": str(checkpoint)})
        method.projector = method.new_projector()
        method.projector.load_state_dict(_read(checkpoint / PROJECTOR_FILE))
        if carries_encoder(manifest):
            method.encoder.load_state_dict(_read(checkpoint / ENCODER_FILE))
            method.carries_encoder = True
        method.encoder.eval()
        method.projector.eval()
        return method

    @torch.no_grad()
    def prompt_embeddings(
        self, prompts: Sequence[list[int]], audio: Sequence[Any], model_dir: Path, device: torch.device
    ) -> list[torch.Tensor]:
        """(prompt length, llm_dim) input embeddings per prompt, on the CPU in the checkpoint's dtype: rows of
        its input embedding matrix for the tokens, projected features (computed on `device`) in the audio slots."""
        assert self.projector is not None
        table = read_tensor(model_dir, INPUT_EMBEDDING)
        waves = list(audio)
        self.projector.to(device)
        out = []
        for start in range(0, len(prompts), _ENCODE_BATCH):
            chunk = slice(start, start + _ENCODE_BATCH)
            for ids, features in zip(prompts[chunk], self.project(waves[chunk], device), strict=True):
                tokens = torch.tensor(ids, device=table.device)
                slots = tokens == AUDIO_SLOT
                embeds = table[tokens.masked_fill(slots, 0)].clone()
                embeds[slots] = features.to(table.device, table.dtype)
                out.append(embeds)
        return out


def _read(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise MethodError(f"{path.parent}: {path.name} is missing (written with every features checkpoint)")
    return load_file(str(path))


def check_encoder(recorded: dict[str, Any], now: dict[str, Any]) -> None:
    """Refuse an encoder whose weight files are not the ones the checkpoint was trained with."""
    where = recorded.get("checkpoint", "the checkpoint")
    for name, digest in recorded.get("weights_sha256", {}).items():
        if now["weights_sha256"].get(name) != digest:
            raise MethodError(
                f"{where}: the speech encoder file {Path(now['path']) / name} changed since training "
                f"(or is missing); the projector was trained on the features of the recorded file"
            )


def carries_encoder(manifest: dict[str, Any]) -> bool:
    """Whether a checkpoint holds the encoder's weights (`speech_encoder.safetensors`): recorded since later
    stages carry a trained encoder on; before that, exactly when its own run trained the encoder."""
    enc = manifest.get("speech_encoder", {})
    return bool(enc.get("weights_file", enc.get("trainable", False)))


def read_manifest(checkpoint: Path) -> dict[str, Any] | None:
    path = checkpoint / METHOD_FILE
    return read_json(path) if path.is_file() else None
