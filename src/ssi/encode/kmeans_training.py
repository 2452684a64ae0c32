"""scripts/train_kmeans.py: k centroids of one layer's features over a random sample of a corpus.

The sample is whole utterances in a seeded random order until `sample.hours` of audio (all of them if the
split is shorter); the features are those scripts/encode_audio.py assigns (same model, layer, feature
extractor and batching), held in memory as fp32: hours x 3600 x frame rate x dim x 4 bytes (10 h of HuBERT
Large at 50 Hz: 7.4 GB). The fit is scikit-learn's MiniBatchKMeans with fairseq's simple_kmeans settings
(k-means++, tol 0, no reassignment). The output is a `.safetensors` file that encode_audio.py reads, with
its provenance in the metadata; an encoder preset for it is one small YAML (docs/encoding.md).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig
from tqdm import tqdm

from ssi.config import required, select
from ssi.encode import EncodeError
from ssi.encode.batching import run_batched
from ssi.encode.encoders import EncoderPreset, LayerFeatures, load_layer_features
from ssi.encode.kmeans import save_centroids
from ssi.encode.provenance import encode_versions
from ssi.encode.reader import AudioProgress, read_chunks, usable
from ssi.encode.settings import RunSettings, device_and_dtype, run_settings, source_spec
from ssi.encode.sources import AudioSource, load_audio_source

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class KMeansSettings:
    """MiniBatchKMeans settings (defaults: fairseq's examples/hubert/simple_kmeans/learn_kmeans.py)."""

    k: int
    batch_size: int = 10000
    max_iter: int = 100
    n_init: int = 20
    max_no_improvement: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.k, self.batch_size, self.max_iter, self.n_init, self.max_no_improvement) < 1:
            raise EncodeError("k and kmeans.{batch_size,max_iter,n_init,max_no_improvement} must be positive")


@dataclass
class FeatureSample:
    features: np.ndarray  # (frames, dim) float32
    utterances: int
    audio_seconds: float
    skipped: int


def sample_features(
    source: AudioSource, features: LayerFeatures, hours: float | None, seed: int, settings: RunSettings
) -> FeatureSample:
    """Layer features of utterances in a seeded random order, until `hours` of audio (None: all)."""
    order = np.random.default_rng(seed).permutation(len(source))
    target = None if hours is None else hours * 3600
    rate = features.fe.sampling_rate
    max_samples = int(settings.batch.seconds * rate)
    exact = (lambda n: features.uses_mask) if settings.batch.exact else (lambda n: True)
    blocks: list[np.ndarray] = []
    utterances, seconds, skipped = 0, 0.0, []
    progress = AudioProgress(len(order), "k-means sample", settings.progress, hours)
    try:
        for chunk in read_chunks(source, order, rate, features.min_samples, settings.chunk_rows, settings.num_workers):
            good = usable(chunk, source.name, settings.on_bad_audio, skipped)
            if target is not None:
                lengths = np.cumsum([len(d.wave) for d in good]) / rate
                good = good[: int(np.searchsorted(lengths, target - seconds)) + 1]
            waves = [d.wave for d in good]
            feats = run_batched(waves, lambda ws: [f.float().cpu().numpy() for f in features(ws)], max_samples,
                                settings.batch.max_rows, exact)  # fmt: skip
            blocks += feats
            chunk_seconds = sum(len(w) for w in waves) / rate
            utterances, seconds = utterances + len(good), seconds + chunk_seconds
            progress.update(len(good), chunk_seconds)
            if target is not None and seconds >= target:
                break
    finally:
        progress.close()
    if not blocks:
        raise EncodeError(f"{source.name}: no usable audio to train k-means on")
    return FeatureSample(np.concatenate(blocks), utterances, seconds, len(skipped))


class FitProgress(io.TextIOBase):
    """MiniBatchKMeans' verbose lines (printed to stdout) turned into two bars with ETA, inits then mini-batch
    steps (with the smoothed inertia), and a log line every tenth of the steps for logs without a terminal."""

    _INIT = re.compile(r"^Inertia for init (\d+)/(\d+): (\S+)")
    _STEP = re.compile(r"^Minibatch step (\d+)/(\d+): mean batch inertia: ([^,]+)(?:, ewa inertia: (\S+))?")

    def __init__(self, n_init: int, enabled: bool) -> None:
        self.enabled = enabled
        self.inits = tqdm(total=n_init, desc="k-means++ inits", unit="init", disable=not enabled)
        self.steps: tqdm | None = None
        self.start = time.monotonic()

    def write(self, text: str) -> int:
        for line in text.splitlines():
            self._line(line.strip())
        return len(text)

    def _line(self, line: str) -> None:
        if match := self._INIT.match(line):
            self.inits.update(1)
            self.inits.set_postfix(inertia=f"{float(match[3]):.4g}")
        elif match := self._STEP.match(line):
            step, total = int(match[1]), int(match[2])
            if self.steps is None:
                self.inits.close()
                self.steps = tqdm(total=total, desc="k-means steps", unit="step", disable=not self.enabled)
            self.steps.update(step - self.steps.n)
            inertia = float(match[4] or match[3])
            self.steps.set_postfix(ewa_inertia=f"{inertia:.4g}", refresh=False)
            if step % max(1, total // 10) == 0:
                elapsed = time.monotonic() - self.start
                LOGGER.info("k-means step %d/%d, inertia %.4g, %.0f s so far", step, total, inertia, elapsed)
        elif line.startswith("Converged"):
            LOGGER.info("k-means: %s", line)

    def __exit__(self, *exc: object) -> None:
        self.inits.close()
        if self.steps is not None:
            self.steps.close()
        super().__exit__(*exc)


def fit_kmeans(x: np.ndarray, settings: KMeansSettings, progress: bool = True) -> tuple[np.ndarray, float]:
    """Centroids (k, dim) float32 and the mean squared distance of a frame to its centroid; the fit's own
    report (each k-means++ init, then each mini-batch step with its inertia) is shown as progress bars."""
    from sklearn.cluster import MiniBatchKMeans

    if x.shape[0] < settings.k:
        raise EncodeError(f"{x.shape[0]} feature frames cannot make k={settings.k} clusters: sample more audio")
    km = MiniBatchKMeans(
        n_clusters=settings.k,
        init="k-means++",
        max_iter=settings.max_iter,
        batch_size=settings.batch_size,
        tol=0.0,
        max_no_improvement=settings.max_no_improvement,
        n_init=settings.n_init,
        reassignment_ratio=0.0,
        compute_labels=False,
        random_state=settings.seed,
        verbose=1,
    )
    with FitProgress(settings.n_init, progress) as report, contextlib.redirect_stdout(report):
        km.fit(x)
    return km.cluster_centers_.astype(np.float32), float(-km.score(x) / x.shape[0])


def _encoder_choice(default: str) -> str:
    """The `encoder=` preset this command was given (Hydra's runtime choice), for the command it prints."""
    from hydra.core.hydra_config import HydraConfig

    return str(HydraConfig.get().runtime.choices.get("encoder", default)) if HydraConfig.initialized() else default


def train_kmeans(cfg: DictConfig) -> dict[str, Any]:
    """Sample features, fit, write the centroids file; returns its metadata."""
    preset = EncoderPreset.from_config(select(cfg, "encoder") or {})
    output = Path(str(required(cfg, "output")))
    overwrite = bool(select(cfg, "overwrite"))
    if output.suffix != ".safetensors":
        raise EncodeError(f"output={output}: the k-means file must end in .safetensors")
    if output.exists() and not overwrite:
        raise EncodeError(f"output={output} already exists; pass overwrite=true to replace it")
    sample = select(cfg, "sample") or {}
    km_cfg = select(cfg, "kmeans") or {}
    unknown = sorted(set(km_cfg) - set(KMeansSettings.__dataclass_fields__))
    if unknown:
        raise EncodeError(f"unknown kmeans.* key(s) {unknown}; known: {sorted(KMeansSettings.__dataclass_fields__)}")
    km_settings = KMeansSettings(k=int(required(cfg, "k")), **km_cfg)
    hours = sample.get("hours")
    spec, columns = source_spec(cfg)
    settings = run_settings(cfg)
    device, dtype = device_and_dtype(cfg)
    features, identity = load_layer_features(preset, device, dtype)
    source = load_audio_source(spec, columns)
    start = time.monotonic()
    drawn = sample_features(
        source, features, None if hours is None else float(hours), int(sample.get("seed", 0)), settings
    )
    fps = preset.frame_rate
    LOGGER.info(
        "features: %d frames x %d dims from %d utterances (%.2f h, %d skipped) in %.0f s; fitting k=%d",
        *drawn.features.shape, drawn.utterances, drawn.audio_seconds / 3600, drawn.skipped,
        time.monotonic() - start, km_settings.k,
    )  # fmt: skip
    centroids, distortion = fit_kmeans(drawn.features, km_settings, settings.progress)
    metadata = {
        **{k: str(v) for k, v in identity.items()},
        "layer": str(preset.layer),
        "k": str(km_settings.k),
        "dim": str(centroids.shape[1]),
        "frame_rate": str(fps),
        "frames": str(drawn.features.shape[0]),
        "utterances": str(drawn.utterances),
        "audio_hours": f"{drawn.audio_seconds / 3600:.4f}",
        "source": spec.source,
        "source_config": str(spec.config),
        "split": spec.split,
        "sample_seed": str(sample.get("seed", 0)),
        "kmeans_settings": json.dumps(km_settings.__dict__),
        "mean_squared_distance": f"{distortion:.6g}",
        "dtype": str(dtype).removeprefix("torch."),
        "versions": json.dumps(encode_versions()),
    }
    save_centroids(output, centroids, metadata, overwrite=overwrite)
    LOGGER.info(
        "k-means: k=%d, dim %d, mean squared distance %.4g -> %s", km_settings.k, centroids.shape[1], distortion, output
    )
    print(
        f"wrote {output}; encode with it:\n  python scripts/encode_audio.py encoder={_encoder_choice(preset.name)} "
        f"encoder.model={preset.model} encoder.layer={preset.layer} encoder.n_units={km_settings.k} "
        f"encoder.kmeans={output} source=... split=... output_dir=...\n"
        "(the encoded folder's encoding.json then records the units and frame rate: train on it with data=sft/encoded "
        "or data=cpt/encoded, no preset to write)"
    )
    return metadata
