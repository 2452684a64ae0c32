"""k-means codebooks: reading the published formats, writing our own, and nearest-centroid search in torch.

Accepted files: a joblib/pickle of an sklearn KMeans/MiniBatchKMeans (`cluster_centers_`; the format of
fairseq's simple_kmeans, textlesslib and Spire; loading it runs pickle, so only load files you trust), a
`.npy` array (k, dim), or the `.safetensors` file scripts/train_kmeans.py writes (tensor `centroids`, with
provenance in its metadata). Assignment is fairseq's ApplyKmeans: argmin over |x|^2 - 2 x.c + |c|^2, in fp32
on the encoder's device, in row blocks so that k x rows scores never exceed a fixed memory budget.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ssi.encode import EncodeError
from ssi.files import file_sha256

KMEANS_FORMAT = "ssi-kmeans/1"
CENTROIDS_TENSOR = "centroids"
SCORE_BLOCK_ELEMENTS = 1 << 26  # rows x k scores per block: 256 MB of fp32


@dataclass(frozen=True)
class Centroids:
    """k centroids of dimension dim (float32), the file they came from and its sha256."""

    values: np.ndarray
    path: Path
    sha256: str
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def k(self) -> int:
        return int(self.values.shape[0])

    @property
    def dim(self) -> int:
        return int(self.values.shape[1])


def load_centroids(path: Path) -> Centroids:
    """Read a k-means file of any accepted format (module docstring); the error names the file."""
    path = Path(path)
    metadata: dict[str, str] = {}
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="numpy") as f:
                metadata = dict(f.metadata() or {})
                if CENTROIDS_TENSOR not in set(f.keys()):
                    raise EncodeError(f"{path}: no tensor {CENTROIDS_TENSOR!r} (tensors: {list(f.keys())})")
                values = f.get_tensor(CENTROIDS_TENSOR)
        elif path.suffix == ".npy":
            values = np.load(path, allow_pickle=False)
        else:
            import joblib

            model = joblib.load(path)
            if not hasattr(model, "cluster_centers_"):
                raise EncodeError(
                    f"{path}: a pickled {type(model).__name__}, not a fitted k-means (no cluster_centers_)"
                )
            values = np.asarray(model.cluster_centers_)
    except EncodeError:
        raise
    except Exception as err:  # pickle, numpy and safetensors raise many types for a file of another format
        raise EncodeError(
            f"cannot read k-means file {path}: {type(err).__name__}: {err} (expected a joblib/pickle of an sklearn "
            "KMeans, a .npy (k, dim) array or a .safetensors file from scripts/train_kmeans.py)"
        ) from None
    values = np.asarray(values)
    if values.ndim != 2 or values.shape[0] < 1 or values.shape[1] < 1:
        raise EncodeError(f"{path}: centroids must be a (k, dim) array, got shape {values.shape}")
    if not np.isfinite(values).all():
        raise EncodeError(f"{path}: centroids hold non-finite values")
    return Centroids(values.astype(np.float32), path, file_sha256(path), metadata)


def save_centroids(path: Path, values: np.ndarray, metadata: dict[str, str], overwrite: bool = False) -> None:
    """Write centroids as `.safetensors` (written beside, then renamed: never half a file)."""
    from safetensors.numpy import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise EncodeError(f"{path}: the k-means output must be a .safetensors file")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=true to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(
            {CENTROIDS_TENSOR: np.ascontiguousarray(values, dtype=np.float32)},
            str(tmp),
            {"format": KMEANS_FORMAT, **metadata},
        )
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class NearestCentroid:
    """Index of the nearest centroid for each row of a (n, dim) tensor, on the centroids' device."""

    def __init__(self, centroids: np.ndarray, device: torch.device) -> None:
        self.weights = torch.from_numpy(np.ascontiguousarray(centroids, dtype=np.float32)).to(device)
        self.transposed = self.weights.T.contiguous()
        self.sq_norms = self.weights.pow(2).sum(dim=1)
        self.block_rows = max(1, SCORE_BLOCK_ELEMENTS // self.weights.shape[0])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.weights.device, torch.float32)
        out = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
        for lo in range(0, x.shape[0], self.block_rows):
            block = x[lo : lo + self.block_rows]
            dist = block.pow(2).sum(dim=1, keepdim=True) - 2 * (block @ self.transposed) + self.sq_norms
            out[lo : lo + self.block_rows] = dist.argmin(dim=1)
        return out
