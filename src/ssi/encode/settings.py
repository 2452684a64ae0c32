"""The settings scripts/encode_audio.py and scripts/train_kmeans.py share (conf/encode_audio.yaml documents
them): the audio source and its columns, device and dtype, and how rows are read and batched."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig

from ssi import report_error
from ssi.config import MissingSettingError, required, select
from ssi.devices import resolve_device
from ssi.dtypes import DtypeError, parse_dtype
from ssi.encode import EncodeError
from ssi.encode.sources import AudioColumns, AudioSourceSpec

ON_BAD_AUDIO = ("fail", "skip")


@dataclass(frozen=True)
class BatchSettings:
    """Batches of at most `seconds` of padded audio and `max_rows` utterances; `exact` pads only where the
    encoder's units do not change under padding (docs/encoding.md)."""

    seconds: float = 300.0
    max_rows: int = 64
    exact: bool = True


@dataclass(frozen=True)
class RunSettings:
    """How rows are read, batched and reported. Only `on_bad_audio` (which rows) and `batch.exact` (whether
    padding may change units) can change the output; both are part of the recorded configuration."""

    batch: BatchSettings
    chunk_rows: int = 1024
    num_workers: int = 4
    on_bad_audio: str = "fail"
    progress: bool = True

    def __post_init__(self) -> None:
        if self.on_bad_audio not in ON_BAD_AUDIO:
            raise EncodeError(f"on_bad_audio must be one of {ON_BAD_AUDIO}, got {self.on_bad_audio!r}")
        if self.chunk_rows < 1 or self.batch.seconds <= 0 or self.batch.max_rows < 1:
            raise EncodeError("chunk_rows, batch.seconds and batch.max_rows must be positive")


def run_settings(cfg: DictConfig) -> RunSettings:
    batch = select(cfg, "batch") or {}
    return RunSettings(
        batch=BatchSettings(
            float(batch.get("seconds", 300.0)), int(batch.get("max_rows", 64)), bool(batch.get("exact", True))
        ),
        chunk_rows=int(select(cfg, "chunk_rows") or 1024),
        num_workers=int(select(cfg, "num_workers") or 1),
        on_bad_audio=str(select(cfg, "on_bad_audio") or "fail"),
        progress=bool(select(cfg, "progress")),
    )


def _optional_str(value: Any) -> str | None:
    return None if value is None else str(value)


def source_spec(cfg: DictConfig) -> tuple[AudioSourceSpec, AudioColumns]:
    spec = AudioSourceSpec(
        source=str(required(cfg, "source")),
        split=str(required(cfg, "split")),
        config=_optional_str(select(cfg, "source_config")),
        revision=_optional_str(select(cfg, "source_revision")),
    )
    return spec, AudioColumns.from_mapping(select(cfg, "columns") or {})


def device_and_dtype(cfg: DictConfig) -> tuple[Any, Any]:
    try:
        return resolve_device(str(select(cfg, "device") or "auto")), parse_dtype(str(select(cfg, "dtype") or "fp32"))
    except (ValueError, DtypeError) as err:
        raise EncodeError(str(err)) from None


def run_cli(work: Callable[[DictConfig], Any], cfg: DictConfig) -> int:
    """An entry point's exit code: 0, or 2 with a one-line error (no traceback) for bad input."""
    try:
        work(cfg)
    except (EncodeError, MissingSettingError) as err:
        return report_error(err)
    return 0
