"""Audio files and bytes to mono float32 waveforms at the encoder's sampling rate.

soundfile (its wheel bundles libsndfile 1.2: wav, flac, ogg, mp3) decodes, channels are averaged to mono,
soxr resamples. torchaudio has no release for torch 2.13 and `datasets` decodes through torchcodec, so
neither is used: a dataset's audio column is read undecoded (bytes or a path) and decoded here.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import soundfile
import soxr

RESAMPLE_QUALITY = "HQ"  # soxr's default quality (band-limited, 0.1 dB pass band ripple)


class AudioError(ValueError):
    """Audio that cannot be used: unreadable, empty or non-finite; the message names the file."""


@dataclass(frozen=True)
class AudioRef:
    """Where one utterance's audio is: embedded bytes (hub and save_to_disk datasets) or a file path."""

    path: str | None
    data: bytes | None = None

    def describe(self) -> str:
        if self.data is not None:
            return f"embedded audio {self.path!r}" if self.path else "embedded audio bytes"
        return f"file {self.path!r}"


def decode_audio(ref: AudioRef, sampling_rate: int) -> np.ndarray:
    """The utterance as a 1-D float32 array at `sampling_rate` (channels averaged, then resampled)."""
    if ref.data is None and not ref.path:
        raise AudioError("no audio (neither bytes nor a path)")
    try:
        wave, rate = soundfile.read(
            io.BytesIO(ref.data) if ref.data is not None else ref.path, dtype="float32", always_2d=True
        )
    except (soundfile.LibsndfileError, RuntimeError, OSError, TypeError, ValueError) as err:
        raise AudioError(f"cannot decode {ref.describe()}: {err}") from None
    if wave.shape[0] == 0:
        raise AudioError(f"{ref.describe()} is empty (0 samples)")
    mono = wave.mean(axis=1, dtype=np.float32) if wave.shape[1] > 1 else wave[:, 0]
    if not np.isfinite(mono).all():
        raise AudioError(f"{ref.describe()} holds non-finite samples")
    if rate != sampling_rate:
        mono = soxr.resample(mono, rate, sampling_rate, quality=RESAMPLE_QUALITY)
    return np.ascontiguousarray(mono, dtype=np.float32)
