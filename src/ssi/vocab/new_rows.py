"""Embedding rows for the tokens that extension appends, drawn so that they look like the base's rows.

`multivariate_normal` draws each new row from a normal with the mean and full covariance of the base
BPE rows, which keeps their norms and directions in the range the network already handles; `mean`
sets every new row to the exact mean row. The fit reads the matrix straight from the safetensors bytes
(numpy only: the extension never imports torch) and takes mean and covariance from a systematic sample
(every k-th row from a seeded offset) of about one row per hidden dimension, at least `MIN_SAMPLE_ROWS`, all
rows of a small model: 2k of Llama 3.2 1B's 128k rows. A new row is the sample mean plus a Gaussian
combination of the centred sample rows, which is exactly a draw from the normal with the sample's mean and
covariance, so the covariance is never formed nor factorised. Its trace is the sample's total variance, so
new rows' norms match the base's. The fit (~0.4 s for 5000 new rows of a 1B model, one core) stays well
inside the copy of the checkpoint, which it runs beside.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ssi.hf_dir import TensorEntry, read_rows_f32

INIT_METHODS = ("multivariate_normal", "mean")
MIN_SAMPLE_ROWS = 2048
_MEAN_CHUNK_ROWS = 8192


def exact_mean(path: Path, entry: TensorEntry, n_rows: int) -> np.ndarray:
    """The mean of the first `n_rows` rows, accumulated in float64 over float32 chunks."""
    total = np.zeros(entry.shape[1], dtype=np.float64)
    for start in range(0, n_rows, _MEAN_CHUNK_ROWS):
        total += read_rows_f32(path, entry, start, min(start + _MEAN_CHUNK_ROWS, n_rows)).sum(0, dtype=np.float64)
    return total / n_rows


def sample_rows(path: Path, entry: TensorEntry, n_fit_rows: int, n_new: int, rng: np.random.Generator) -> np.ndarray:
    """`n_new` float32 rows from N(mean, covariance) of a systematic sample of the first `n_fit_rows` rows of a
    (vocab, hidden) matrix."""
    stride = -(-n_fit_rows // max(entry.shape[1], MIN_SAMPLE_ROWS))  # about one sampled row per hidden dimension
    sample = read_rows_f32(path, entry, int(rng.integers(stride)), n_fit_rows, step=stride)
    mean = sample.mean(0, dtype=np.float64).astype(np.float32)
    sample -= mean
    # With z ~ N(0, I_n), z @ sample / sqrt(n) ~ N(0, sample.T @ sample / n): the sample's own covariance,
    # without forming it or factorising it (and whatever its rank).
    z = rng.standard_normal((n_new, len(sample)), dtype=np.float32)
    return mean + (z @ sample) / np.float32(np.sqrt(len(sample)))


def new_rows(
    path: Path, entry: TensorEntry, n_fit_rows: int, n_new: int, init: str, rng: np.random.Generator
) -> np.ndarray:
    """The `n_new` rows appended to a (vocab, hidden) matrix, as float32, fitted to its first `n_fit_rows` rows."""
    if init == "mean":
        return np.tile(exact_mean(path, entry, n_fit_rows).astype(np.float32), (n_new, 1))
    return sample_rows(path, entry, n_fit_rows, n_new, rng)
