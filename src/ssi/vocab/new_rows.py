"""Embedding rows for the tokens that extension appends, drawn so that they look like the base's rows.

`multivariate_normal` draws each new row from a normal with the mean and full covariance of the base
BPE rows, which keeps their norms and directions in the range the network already handles; `mean`
sets every new row to the exact mean row. The fit reads the matrix straight from the safetensors bytes
(numpy only: the extension never imports torch) and estimates mean and covariance from a systematic
sample (every k-th row from a seeded offset) of `COV_ROWS_PER_DIM` rows per hidden dimension, at least
`MIN_COV_ROWS`, all rows of a small model: 8k of Llama 3.2 1B's 128k rows for its 2048 x 2048 covariance.
The trace of the estimate is unbiased, so the new rows' norms match the base's, and the fit (~1 s for
5000 new rows, one core) stays shorter than copying the checkpoint, which it runs beside.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ssi.hf_dir import TensorEntry, read_rows_f32

INIT_METHODS = ("multivariate_normal", "mean")
COV_ROWS_PER_DIM = 4
MIN_COV_ROWS = 8192
_MEAN_CHUNK_ROWS = 8192


def exact_mean(path: Path, entry: TensorEntry, n_rows: int) -> np.ndarray:
    """The mean of the first `n_rows` rows, accumulated in float64 over float32 chunks."""
    total = np.zeros(entry.shape[1], dtype=np.float64)
    for start in range(0, n_rows, _MEAN_CHUNK_ROWS):
        total += read_rows_f32(path, entry, start, min(start + _MEAN_CHUNK_ROWS, n_rows)).sum(0, dtype=np.float64)
    return total / n_rows


def sample_rows(path: Path, entry: TensorEntry, n_fit_rows: int, n_new: int, rng: np.random.Generator) -> np.ndarray:
    """`n_new` float32 rows from N(mean, covariance) of the first `n_fit_rows` rows of a (vocab, hidden) matrix."""
    hidden = entry.shape[1]
    stride = -(-n_fit_rows // max(COV_ROWS_PER_DIM * hidden, MIN_COV_ROWS))
    sample = read_rows_f32(path, entry, int(rng.integers(stride)), n_fit_rows, step=stride)
    mean = sample.mean(0, dtype=np.float64).astype(np.float32)
    sample -= mean
    cov = (sample.T @ sample) / np.float32(len(sample))  # Cholesky and eigh read one triangle
    jitter = np.float32(1e-6 * float(np.mean(np.diag(cov))))
    try:
        factor = np.linalg.cholesky(cov + jitter * np.eye(hidden, dtype=np.float32))
    except np.linalg.LinAlgError:  # rank-deficient (fewer rows than dimensions): sample in the spanned subspace
        eigvals, eigvecs = np.linalg.eigh(cov.astype(np.float64))
        factor = (eigvecs * np.sqrt(np.clip(eigvals, 0, None))).astype(np.float32)
    z = rng.standard_normal((n_new, hidden), dtype=np.float32)
    return mean + z @ factor.T


def new_rows(
    path: Path, entry: TensorEntry, n_fit_rows: int, n_new: int, init: str, rng: np.random.Generator
) -> np.ndarray:
    """The `n_new` rows appended to a (vocab, hidden) matrix, as float32, fitted to its first `n_fit_rows` rows."""
    if init == "mean":
        return np.tile(exact_mean(path, entry, n_fit_rows).astype(np.float32), (n_new, 1))
    return sample_rows(path, entry, n_fit_rows, n_new, rng)
