"""Unit encoders named by the presets in conf/encoder/ (docs/encoding.md): audio batches to unit ids.

- `ssl_kmeans`: a HuBERT-like transformers model (hubert, wav2vec2, wavlm, data2vec-audio); the output of
  transformer layer `layer` (1-based, fairseq's `output_layer`: the model is cut after that layer and the
  layer's output is taken by a forward hook, so no final layer norm is applied), then the nearest k-means
  centroid.
- `mimi`: `MimiModel.encode(..., num_quantizers=codebook + 1)` and that codebook's codes.

Audio is prepared by the model's own feature extractor (preprocessor_config.json: sampling rate, waveform
normalisation, attention mask), so units equal what transformers gives for the same audio. A padded batch
row encodes exactly as the utterance alone only where the model allows it (`padding_exact`): layer-norm
HuBERT-like models with an attention mask always; group-norm ones (HuBERT base) never, since their first
convolution normalises over the padding; Mimi when the utterance fills whole frames, since its causal
encoder changes only a last partial frame under padding. The batcher pads nothing else.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ssi.dtypes import short_name
from ssi.encode import EncodeError
from ssi.encode.kmeans import Centroids, NearestCentroid, load_centroids
from ssi.encode.provenance import resolve_file, resolve_model

SSL_MODEL_TYPES = ("hubert", "wav2vec2", "wavlm", "data2vec-audio")
BACKENDS = ("ssl_kmeans", "mimi", "unsupported")
# Identity fields that name where things came from rather than what they are: a moved k-means file or a
# hub id downloaded to a local directory encodes the same units (the hashes decide).
LOCATION_FIELDS = ("model", "model_revision", "kmeans")


@dataclass(frozen=True)
class EncoderPreset:
    """An encoder preset (conf/encoder/*.yaml): units and frame rate, and how to compute them."""

    name: str
    n_units: int
    sampling_rate: int
    downsampling_ratio: int
    backend: str
    model: str | None = None
    revision: str | None = None
    layer: int | None = None
    kmeans: str | None = None
    codebook: int = 0
    reason: str | None = None

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> EncoderPreset:
        missing = [
            k for k in ("name", "n_units", "sampling_rate", "downsampling_ratio", "backend") if cfg.get(k) is None
        ]
        if missing:
            raise EncodeError(f"encoder preset lacks {missing} (conf/encoder/*.yaml documents the keys)")
        preset = cls(
            name=str(cfg["name"]),
            n_units=int(cfg["n_units"]),
            sampling_rate=int(cfg["sampling_rate"]),
            downsampling_ratio=int(cfg["downsampling_ratio"]),
            backend=str(cfg["backend"]),
            model=None if cfg.get("model") is None else str(cfg["model"]),
            revision=None if cfg.get("revision") is None else str(cfg["revision"]),
            layer=None if cfg.get("layer") is None else int(cfg["layer"]),
            kmeans=None if cfg.get("kmeans") is None else str(cfg["kmeans"]),
            codebook=int(cfg.get("codebook") or 0),
            reason=cfg.get("reason"),
        )
        if preset.backend not in BACKENDS:
            raise EncodeError(f"encoder {preset.name!r}: backend must be one of {BACKENDS}, got {preset.backend!r}")
        if preset.backend != "unsupported" and preset.model is None:
            raise EncodeError(f"encoder {preset.name!r}: set encoder.model=<HF model directory or hub id>")
        return preset

    @property
    def frame_rate(self) -> float:
        return self.sampling_rate / self.downsampling_ratio

    def refuse_if_unsupported(self) -> None:
        if self.backend == "unsupported":
            raise EncodeError(f"encoder {self.name!r} cannot be encoded here: {self.reason or 'no backend'}")


def feature_extractor(model_dir: Path, sampling_rate: int) -> Any:
    """The model's own feature extractor; it must exist and run at the preset's sampling rate."""
    from transformers import AutoFeatureExtractor

    if not (model_dir / "preprocessor_config.json").is_file():
        raise EncodeError(
            f"{model_dir} has no preprocessor_config.json (the feature extractor: sampling rate, waveform "
            "normalisation, attention mask); copy the one of the hub model it was converted from"
        )
    fe = AutoFeatureExtractor.from_pretrained(model_dir)
    if int(fe.sampling_rate) != sampling_rate:
        raise EncodeError(
            f"{model_dir}: the feature extractor runs at {fe.sampling_rate} Hz but the encoder preset says "
            f"sampling_rate={sampling_rate}"
        )
    return fe


def _model_config(model_dir: Path) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError) as err:
        raise EncodeError(f"{model_dir}: not a transformers model directory ({err})") from None


def _check_frame_size(preset: EncoderPreset, frame_size: int, model_dir: Path) -> None:
    if frame_size != preset.downsampling_ratio:
        raise EncodeError(
            f"{model_dir}: the model has {frame_size} samples per frame but encoder {preset.name!r} says "
            f"downsampling_ratio={preset.downsampling_ratio}"
        )


class LayerFeatures:
    """Output of one transformer layer (1-based) of a HuBERT-like model, per utterance of a batch."""

    def __init__(self, model_dir: Path, layer: int, preset: EncoderPreset, device: torch.device, dtype: torch.dtype):
        from transformers import AutoModel

        config = _model_config(model_dir)
        if config.model_type not in SSL_MODEL_TYPES:
            raise EncodeError(
                f"{model_dir}: model_type {config.model_type!r}; backend ssl_kmeans needs one of {SSL_MODEL_TYPES}"
            )
        if not 1 <= layer <= config.num_hidden_layers:
            raise EncodeError(
                f"encoder.layer={layer}: {model_dir} has transformer layers 1..{config.num_hidden_layers}"
            )
        _check_frame_size(preset, math.prod(config.conv_stride), model_dir)
        self.fe = feature_extractor(model_dir, preset.sampling_rate)
        self.uses_mask = bool(self.fe.return_attention_mask)
        self.hidden_size = int(config.hidden_size)
        self.device, self.dtype = device, dtype
        model = AutoModel.from_pretrained(model_dir, dtype=dtype)
        model.encoder.layers = model.encoder.layers[:layer]  # later layers are never needed
        model.encoder.layers[layer - 1].register_forward_hook(self._capture)
        self.model = model.to(device).eval()
        self._captured: torch.Tensor | None = None
        self.min_samples = _min_samples(self.n_frames)

    def _capture(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        self._captured = output[0] if isinstance(output, tuple) else output

    def n_frames(self, n_samples: int) -> int:
        return int(self.model._get_feat_extract_output_lengths(torch.tensor(n_samples)))

    @torch.inference_mode()
    def __call__(self, waves: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """(frames, hidden) per utterance, on the model's device, in the model's dtype."""
        inputs = self.fe(
            list(waves),
            sampling_rate=self.fe.sampling_rate,
            padding=True,
            return_attention_mask=self.uses_mask,
            return_tensors="pt",
        )
        mask = inputs.get("attention_mask")
        self.model(
            inputs["input_values"].to(self.device, self.dtype),
            attention_mask=None if mask is None else mask.to(self.device),
        )
        hidden, self._captured = self._captured, None
        assert hidden is not None, "the layer hook did not fire"
        return [hidden[i, : self.n_frames(len(w))] for i, w in enumerate(waves)]

    def describe(self) -> dict[str, Any]:
        fe = self.fe
        return {"do_normalize": bool(getattr(fe, "do_normalize", False)), "return_attention_mask": self.uses_mask}


def _min_samples(n_frames: Any, limit: int = 1 << 20) -> int:
    """Fewest samples that give one frame (HuBERT: 400, the first convolution's kernel)."""
    lo, hi = 1, limit
    while lo < hi:
        mid = (lo + hi) // 2
        if n_frames(mid) >= 1:
            hi = mid
        else:
            lo = mid + 1
    return lo


class UnitEncoder(ABC):
    """A batch of mono waveforms at `preset.sampling_rate` -> unit ids (int64) per utterance."""

    preset: EncoderPreset
    min_samples: int = 1

    @abstractmethod
    def padding_exact(self, n_samples: int) -> bool:
        """Whether an utterance of this length, right-padded in a batch, encodes exactly as alone."""

    @abstractmethod
    def encode(self, waves: Sequence[np.ndarray]) -> list[np.ndarray]: ...

    @abstractmethod
    def identity(self) -> dict[str, Any]:
        """What the units depend on (manifest `encoder` section): a change refuses resuming an output."""


class KMeansEncoder(UnitEncoder):
    """Layer features -> nearest k-means centroid (backend `ssl_kmeans`)."""

    def __init__(
        self, preset: EncoderPreset, features: LayerFeatures, centroids: Centroids, model_identity: dict
    ) -> None:
        if centroids.dim != features.hidden_size:
            raise EncodeError(
                f"k-means file {centroids.path}: centroids have dimension {centroids.dim} but {preset.model} "
                f"layer {preset.layer} has {features.hidden_size} features"
            )
        self.preset, self.features, self.centroids = preset, features, centroids
        self.nearest = NearestCentroid(centroids.values, features.device)
        self.min_samples = features.min_samples
        self.model_identity = model_identity

    def padding_exact(self, n_samples: int) -> bool:
        return self.features.uses_mask

    def encode(self, waves: Sequence[np.ndarray]) -> list[np.ndarray]:
        feats = self.features(waves)
        units = self.nearest(torch.cat(feats)).cpu().numpy()
        return np.split(units, np.cumsum([f.shape[0] for f in feats])[:-1])

    def identity(self) -> dict[str, Any]:
        return {
            **_preset_identity(self.preset),
            **self.model_identity,
            "layer": self.preset.layer,
            "kmeans": self.preset.kmeans,
            "kmeans_sha256": self.centroids.sha256,
            "dtype": short_name(self.features.dtype),
            "feature_extractor": self.features.describe(),
        }


class MimiEncoder(UnitEncoder):
    """One codebook of Mimi's split RVQ (backend `mimi`)."""

    def __init__(
        self, preset: EncoderPreset, model_dir: Path, model_identity: dict, device: torch.device, dtype: torch.dtype
    ):
        from transformers import MimiModel

        config = _model_config(model_dir)
        if config.model_type != "mimi":
            raise EncodeError(f"{model_dir}: model_type {config.model_type!r}; encoder.backend=mimi needs a Mimi model")
        if config.codebook_size != preset.n_units:
            raise EncodeError(
                f"{model_dir}: codebooks of {config.codebook_size} entries but encoder {preset.name!r} says "
                f"n_units={preset.n_units}"
            )
        if not 0 <= preset.codebook < config.num_quantizers:
            raise EncodeError(
                f"encoder.codebook={preset.codebook}: {model_dir} has codebooks 0..{config.num_quantizers - 1}"
            )
        self.frame_size = round(config.sampling_rate / config.frame_rate)
        _check_frame_size(preset, self.frame_size, model_dir)
        self.fe = feature_extractor(model_dir, preset.sampling_rate)
        self.preset, self.device, self.dtype, self.model_identity = preset, device, dtype, model_identity
        self.model = MimiModel.from_pretrained(model_dir, dtype=dtype).to(device).eval()

    def padding_exact(self, n_samples: int) -> bool:
        return n_samples % self.frame_size == 0

    @torch.inference_mode()
    def encode(self, waves: Sequence[np.ndarray]) -> list[np.ndarray]:
        inputs = self.fe(raw_audio=list(waves), sampling_rate=self.fe.sampling_rate, padding=True, return_tensors="pt")
        codes = self.model.encode(
            inputs["input_values"].to(self.device, self.dtype),
            num_quantizers=self.preset.codebook + 1,
            return_dict=True,
        ).audio_codes[:, self.preset.codebook]
        lengths = self.model.get_encoded_length(torch.tensor([len(w) for w in waves])).tolist()
        codes = codes.cpu().numpy().astype(np.int64)
        return [codes[i, :n] for i, n in enumerate(lengths)]

    def identity(self) -> dict[str, Any]:
        return {
            **_preset_identity(self.preset),
            **self.model_identity,
            "codebook": self.preset.codebook,
            "dtype": short_name(self.dtype),
        }


def _preset_identity(preset: EncoderPreset) -> dict[str, Any]:
    return {
        "name": preset.name,
        "backend": preset.backend,
        "n_units": preset.n_units,
        "sampling_rate": preset.sampling_rate,
        "downsampling_ratio": preset.downsampling_ratio,
        "frame_rate": preset.frame_rate,
    }


def load_layer_features(preset: EncoderPreset, device: torch.device, dtype: torch.dtype) -> tuple[LayerFeatures, dict]:
    """The feature model of an `ssl_kmeans` preset and its identity (also what scripts/train_kmeans.py clusters)."""
    if preset.backend != "ssl_kmeans":
        raise EncodeError(
            f"encoder {preset.name!r} (backend {preset.backend}) has no k-means: use an ssl_kmeans preset"
        )
    if preset.layer is None:
        raise EncodeError(f"encoder {preset.name!r}: set encoder.layer=<transformer layer, 1-based>")
    model_dir, identity = resolve_model(str(preset.model), preset.revision)
    return LayerFeatures(model_dir, preset.layer, preset, device, dtype), identity


def build_encoder(cfg: Mapping[str, Any], device: torch.device, dtype: torch.dtype) -> UnitEncoder:
    """The encoder of a preset, checked against it (units, frame rate, k-means shape); errors name the file."""
    preset = EncoderPreset.from_config(cfg)
    preset.refuse_if_unsupported()
    if preset.backend == "mimi":
        model_dir, identity = resolve_model(str(preset.model), preset.revision)
        return MimiEncoder(preset, model_dir, identity, device, dtype)
    if preset.kmeans is None:
        raise EncodeError(
            f"encoder {preset.name!r} needs a k-means file: pass encoder.kmeans=<file> (sklearn/joblib, .npy or "
            "scripts/train_kmeans.py's .safetensors; docs/encoding.md)"
        )
    centroids = load_centroids(resolve_file(preset.kmeans))
    if centroids.k != preset.n_units:
        raise EncodeError(
            f"k-means file {centroids.path} has k={centroids.k} centroids but encoder {preset.name!r} says "
            f"n_units={preset.n_units}"
        )
    features, identity = load_layer_features(preset, device, dtype)
    return KMeansEncoder(preset, features, centroids, identity)
