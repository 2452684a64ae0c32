"""What a set of units was made from, recorded in the manifest: model files (hub commit and weight hash),
the k-means file's hash and the package versions. Hub files are fetched through huggingface_hub's cache."""

from __future__ import annotations

import hashlib
from pathlib import Path

from ssi.encode import EncodeError
from ssi.files import file_sha256
from ssi.locations import hub_failure_message, looks_local, missing_path_message
from ssi.versions import package_versions

HF_PREFIX = "hf://"
WEIGHT_PATTERNS = ("*.safetensors", "*.bin")  # in transformers' order of preference
# The stack whose versions can change units: decoding, resampling, the encoder and the k-means reader.
ENCODE_STACK = ("ssi", "torch", "transformers", "datasets", "soundfile", "soxr", "numpy", "scikit-learn", "pyarrow")


def weight_files(model_dir: Path) -> list[Path]:
    """The weight files transformers loads: safetensors when there are any, else PyTorch .bin files."""
    for pattern in WEIGHT_PATTERNS:
        if files := sorted(model_dir.glob(pattern)):
            return files
    return []


def weights_sha256(model_dir: Path) -> str:
    """One hash over a model directory's weight files (names and contents, in name order)."""
    files = weight_files(model_dir)
    if not files:
        raise EncodeError(f"{model_dir}: no weights (*.safetensors or *.bin)")
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0" + file_sha256(path).encode() + b"\n")
    return digest.hexdigest()


# How to work without the hub (docs/encoding.md, "Models without the hub").
LOCAL_MODEL_HINT = (
    ". To use a downloaded model, pass encoder.model=<its local directory> (download it once with "
    "`huggingface-cli download <hub id> --local-dir models/<name>`); for a dry run, "
    "`python scripts/make_tiny_encoder.py --output models/tiny-hubert` builds a tiny random one"
)


def resolve_model(model: str, revision: str | None = None) -> tuple[Path, dict[str, str | None]]:
    """A local model directory for `model` (a directory, or a hub id fetched into the HF cache), and its
    identity for the manifest: the name given, the hub commit (null for a local directory), the weights' hash."""
    local = Path(model).expanduser()
    if local.is_dir():
        if revision is not None:
            raise EncodeError(f"encoder.revision={revision!r} applies to hub ids, but {model} is a local directory")
        directory, commit = local, None
    elif local.exists():
        raise EncodeError(f"encoder.model={model} is not a directory (a HF model directory or a hub id)")
    elif looks_local(model):
        raise EncodeError(missing_path_message("encoder.model", model) + LOCAL_MODEL_HINT)
    else:
        from huggingface_hub import snapshot_download

        try:  # configs and one kind of weights: safetensors, else .bin (never both, nor TF/Flax files)
            for weights in WEIGHT_PATTERNS:
                directory = Path(snapshot_download(model, revision=revision, allow_patterns=["*.json", weights]))
                if weight_files(directory):
                    break
        except Exception as err:  # offline, gated, missing repo or revision: huggingface_hub raises many types
            raise EncodeError(hub_failure_message("encoder.model", model, err) + LOCAL_MODEL_HINT) from None
        commit = directory.name
    return directory, {"model": model, "model_revision": commit, "model_sha256": weights_sha256(directory)}


def resolve_file(name: str) -> Path:
    """A local file, or `hf://<owner>/<repo>/<path in the repo>` downloaded from a hub model repository."""
    if not name.startswith(HF_PREFIX):
        path = Path(name).expanduser()
        if not path.is_file():
            raise EncodeError(f"{name} is not a file")
        return path
    parts = name[len(HF_PREFIX) :].split("/")
    if len(parts) < 3 or not all(parts):
        raise EncodeError(f"{name}: expected hf://<owner>/<repo>/<file>")
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download("/".join(parts[:2]), "/".join(parts[2:])))
    except Exception as err:  # see resolve_model
        raise EncodeError(f"cannot download {name}: {err}") from None


def encode_versions() -> dict[str, str]:
    return package_versions(ENCODE_STACK)
