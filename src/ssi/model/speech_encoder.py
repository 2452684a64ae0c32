"""A pretrained speech encoder's continuous features at one layer, one tensor per utterance (docs/features.md).

The continuous-features method (SLAM-ASR style) feeds these through a trained projector into the LLM. Any
transformers audio encoder directory works: the HuBERT family (`hubert`, `wav2vec2`, `wavlm`,
`data2vec-audio`) and the Whisper encoder. Audio is prepared by the model's own feature extractor
(preprocessor_config.json), as `scripts/encode_audio.py` does.

- `layer`: 1-based transformer layer whose output is taken (the model is cut after it, so later layers
  cost nothing and no final layer norm is applied: fairseq's `output_layer`, as in the unit encoders), or
  -1 for the encoder's own output (`last_hidden_state`, final layer norm included).
- Padding never changes an utterance's features: models whose feature extractor gives an attention mask
  run batched with it; the others (group-norm HuBERT base normalises over the padding) run one utterance
  at a time. Every output is trimmed to the utterance's own frames.
- Whisper's encoder takes exactly 30 s: longer audio is cut into 30 s windows, each window's output is
  trimmed to its audio (50 frames per second), and the pieces are joined.
- Layer drop is off (`layerdrop` / `encoder_layerdrop` set to 0 whatever the config says): a trained encoder
  runs in train mode, where a dropped layer would skip the layer whose output is taken and, on several ranks,
  give each rank another set of parameters with gradients (docs/features.md, "The speech encoder").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

HUBERT_LIKE = ("hubert", "wav2vec2", "wavlm", "data2vec-audio")
WHISPER = ("whisper",)
LAYER_DROP_KEYS = ("layerdrop", "encoder_layerdrop")  # HuBERT family / Whisper's encoder


class SpeechEncoderError(ValueError):
    """A speech encoder directory or layer that cannot be used."""


def _load_config(model_dir: Path) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError) as err:
        raise SpeechEncoderError(
            f"speech_encoder.model={model_dir}: not a transformers model directory ({err})"
        ) from None


def _load_feature_extractor(model_dir: Path) -> Any:
    from transformers import AutoFeatureExtractor

    if not (model_dir / "preprocessor_config.json").is_file():
        raise SpeechEncoderError(
            f"{model_dir} has no preprocessor_config.json (the feature extractor: sampling rate, normalisation, "
            "attention mask); copy the one of the hub model it was converted from"
        )
    return AutoFeatureExtractor.from_pretrained(model_dir)


@dataclass(frozen=True)
class FrameCount:
    """How many feature frames an utterance of n samples gives, from the model's config alone (picklable, so
    DataLoader workers size the audio span of a prompt without the model): a stack of convolutions without
    padding (HuBERT family: `conv_kernel`, `conv_stride`), or a fixed hop trimmed to the audio (Whisper)."""

    kernels: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    samples_per_frame: int = 0

    def __call__(self, n_samples: int) -> int:
        if not self.kernels:
            return math.ceil(n_samples / self.samples_per_frame)
        length = n_samples
        for kernel, stride in zip(self.kernels, self.strides, strict=True):
            length = max((length - kernel) // stride + 1, 0)
        return length


@dataclass(frozen=True)
class AudioSlots:
    """How many prompt positions an utterance of n samples (at `sampling_rate`) takes: one per projector
    output of its encoder frames (`frames`: a FrameCount). Picklable, for workers."""

    frames: Callable[[int], int]
    downsample: int
    sampling_rate: int

    def __call__(self, n_samples: int) -> int:
        return math.ceil(self.frames(n_samples) / self.downsample)


class SpeechEncoder(nn.Module):
    """Waveforms (mono, at `sampling_rate`) -> (frames, `dim`) features per utterance."""

    def __init__(self, model_dir: str | Path, layer: int = -1) -> None:
        super().__init__()
        from transformers import AutoModel

        model_dir = Path(model_dir)
        config = _load_config(model_dir)
        self.model_type = str(config.model_type)
        if self.model_type not in HUBERT_LIKE + WHISPER:
            raise SpeechEncoderError(
                f"speech_encoder.model={model_dir}: model_type {self.model_type!r} is not an audio encoder this "
                f"method reads ({', '.join(HUBERT_LIKE + WHISPER)})"
            )
        self.feature_extractor = _load_feature_extractor(model_dir)
        self.sampling_rate = int(self.feature_extractor.sampling_rate)
        # the layer drop the config ships (0.1 for HuBERT, wav2vec 2.0, WavLM), switched off: see the docstring
        self.layer_drop_off = {key: float(getattr(config, key)) for key in LAYER_DROP_KEYS if getattr(config, key, 0)}
        for key in self.layer_drop_off:
            setattr(config, key, 0.0)
        model = AutoModel.from_pretrained(model_dir, config=config, dtype=torch.float32)
        encoder = model.get_encoder() if self.model_type in WHISPER else model
        layers = encoder.layers if self.model_type in WHISPER else encoder.encoder.layers
        n_layers = len(layers)
        if layer != -1 and not 1 <= layer <= n_layers:
            raise SpeechEncoderError(
                f"speech_encoder.layer={layer}: {model_dir} has transformer layers 1..{n_layers} (or -1: the output)"
            )
        self.layer = layer
        self._captured: torch.Tensor | None = None
        if layer != -1:
            del layers[layer:]  # later layers are never needed
            layers[layer - 1].register_forward_hook(self._capture)
        self.model = encoder
        self.dim = int(config.d_model if self.model_type in WHISPER else config.hidden_size)
        self.batched = bool(getattr(self.feature_extractor, "return_attention_mask", False))
        if self.model_type in WHISPER:
            self.window_samples = int(self.feature_extractor.n_samples)  # 30 s
            self.samples_per_frame = int(self.feature_extractor.hop_length) * math.prod(
                int(conv.stride[0]) for conv in (encoder.conv1, encoder.conv2)
            )
            self.n_frames = FrameCount(samples_per_frame=self.samples_per_frame)
        else:
            self.samples_per_frame = math.prod(config.conv_stride)
            self.n_frames = FrameCount(tuple(config.conv_kernel), tuple(config.conv_stride))

    @property
    def frame_rate(self) -> float:
        return self.sampling_rate / self.samples_per_frame

    def _capture(self, module: nn.Module, args: Any, output: Any) -> None:
        self._captured = output[0] if isinstance(output, tuple) else output

    def _run(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        out = self.model(**inputs)
        if self.layer == -1:
            return out.last_hidden_state
        hidden, self._captured = self._captured, None
        if hidden is None:  # only if a layer was skipped, which layer drop off rules out
            raise RuntimeError(f"layer {self.layer} of the {self.model_type} encoder did not run")
        return hidden

    def forward(self, waves: Sequence[np.ndarray]) -> list[torch.Tensor]:
        device = next(self.model.parameters()).device
        if self.model_type in WHISPER:
            return [self._whisper(wave, device) for wave in waves]
        if self.batched:
            return self._hubert(waves, device)
        return [self._hubert([wave], device)[0] for wave in waves]

    def _hubert(self, waves: Sequence[np.ndarray], device: torch.device) -> list[torch.Tensor]:
        prepared = self.feature_extractor(
            list(waves),
            sampling_rate=self.sampling_rate,
            padding=True,
            return_attention_mask=self.batched,
            return_tensors="pt",
        )
        inputs = {"input_values": prepared["input_values"].to(device)}
        if self.batched:
            inputs["attention_mask"] = prepared["attention_mask"].to(device)
        hidden = self._run(inputs)
        return [hidden[i, : self.n_frames(len(w))] for i, w in enumerate(waves)]

    def _whisper(self, wave: np.ndarray, device: torch.device) -> torch.Tensor:
        pieces = []
        for start in range(0, max(len(wave), 1), self.window_samples):
            window = wave[start : start + self.window_samples]
            prepared = self.feature_extractor(
                window, sampling_rate=self.sampling_rate, padding="max_length", return_tensors="pt"
            )
            hidden = self._run({"input_features": prepared["input_features"].to(device)})
            pieces.append(hidden[0, : self.n_frames(len(window))])
        return torch.cat(pieces)
