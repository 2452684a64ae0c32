"""Rows of an audio source decoded in a thread pool, one chunk ahead of the encoder.

soundfile and soxr release the GIL while they work, so threads decode and resample the next chunk while
the encoder runs on the current one; at most two chunks of waveforms are held in memory. Rows without
usable audio fail the run or are skipped (`usable`); `AudioProgress` reports the hours of audio done.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from ssi.encode import EncodeError
from ssi.encode.audio import AudioError, decode_audio
from ssi.encode.sources import AudioRow, AudioSource

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decoded:
    """A row with its waveform, or the reason it has none (unreadable, empty, too short to encode)."""

    row: AudioRow
    wave: np.ndarray | None
    error: str | None = None


def decode_row(row: AudioRow, sampling_rate: int, min_samples: int) -> Decoded:
    try:
        wave = decode_audio(row.audio, sampling_rate)
    except AudioError as err:
        return Decoded(row, None, str(err))
    if len(wave) < min_samples:
        return Decoded(
            row,
            None,
            f"{row.audio.describe()} is too short: {len(wave)} samples at {sampling_rate} Hz, the encoder needs "
            f"at least {min_samples}",
        )
    return Decoded(row, wave)


def read_chunks(
    source: AudioSource,
    indices: Sequence[int],
    sampling_rate: int,
    min_samples: int,
    chunk_rows: int,
    num_workers: int,
) -> Iterator[list[Decoded]]:
    """Decoded rows of `indices`, in order, `chunk_rows` at a time."""
    pool = ThreadPoolExecutor(max_workers=max(1, num_workers), thread_name_prefix="decode")
    pending: list[Future[Decoded]] | None = None
    try:
        for lo in range(0, len(indices), chunk_rows):
            rows = source.rows(indices[lo : lo + chunk_rows])
            submitted = [pool.submit(decode_row, row, sampling_rate, min_samples) for row in rows]
            if pending is not None:
                yield [f.result() for f in pending]
            pending = submitted
        if pending is not None:
            yield [f.result() for f in pending]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def usable(chunk: list[Decoded], source: str, on_bad_audio: str, skipped: list[dict]) -> list[Decoded]:
    """The rows with audio; a row without fails the run (`fail`) or is appended to `skipped` (`skip`)."""
    good = []
    for item in chunk:
        if item.wave is not None:
            good.append(item)
            continue
        where = f"{source}: row {item.row.index} (id {item.row.id!r})"
        if on_bad_audio == "fail":
            raise EncodeError(f"{where}: {item.error} (on_bad_audio=skip leaves such rows out)")
        LOGGER.warning("%s: skipped: %s", where, item.error)
        skipped.append({"row": item.row.index, "id": item.row.id, "reason": item.error})
    return good


class AudioProgress:
    """A bar in hours of audio with the speed as a multiple of real time (audio seconds per wall second);
    its total is `hours` when known, else estimated from the mean utterance duration so far."""

    def __init__(self, n_rows: int, desc: str, enabled: bool, hours: float | None = None) -> None:
        self.n_rows, self.rows, self.seconds, self.start = n_rows, 0, 0.0, time.monotonic()
        self.hours = hours
        self.bar = tqdm(
            total=hours or 0.0,
            desc=desc,
            disable=not enabled,
            bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.2f}/{total:.2f} h audio [{elapsed}<{remaining}{postfix}]",
        )

    def update(self, rows: int, seconds: float) -> None:
        self.rows, self.seconds = self.rows + rows, self.seconds + seconds
        estimate = self.seconds / max(self.rows, 1) * self.n_rows / 3600 if self.hours is None else self.hours
        self.bar.total = max(estimate, self.seconds / 3600)  # the last utterance may overshoot a fixed total
        self.bar.update(seconds / 3600)
        self.bar.set_postfix_str(f"{self.speed():.0f}x real time, {self.rows}/{self.n_rows} utterances")

    def speed(self) -> float:
        return self.seconds / max(time.monotonic() - self.start, 1e-9)

    def close(self) -> None:
        self.bar.close()
