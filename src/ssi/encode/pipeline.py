"""scripts/encode_audio.py: one shard of one split of an audio dataset -> units in the MLS schema.

read (threads, one chunk ahead) -> length-sorted exact batches -> encoder -> parquet shard in split order
-> manifest. conf/encode_audio.yaml documents every setting; docs/encoding.md is the contract.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from omegaconf import DictConfig

from ssi.config import required, select
from ssi.encode.batching import run_batched
from ssi.encode.encoders import EncoderPreset, UnitEncoder, build_encoder
from ssi.encode.output import EncodedOutput, ShardWriter, output_schema
from ssi.encode.provenance import encode_versions
from ssi.encode.reader import AudioProgress, Decoded, read_chunks, usable
from ssi.encode.settings import RunSettings, device_and_dtype, run_settings, source_spec
from ssi.encode.sharding import resolve_shard, shard_range
from ssi.encode.sources import AudioSource, load_audio_source

LOGGER = logging.getLogger(__name__)
MAX_SKIPS_IN_FOOTER = 1000


def _list_array(units: list[np.ndarray]) -> pa.ListArray:
    """One list<int64> column from per-row arrays, without a Python int per frame."""
    offsets = np.zeros(len(units) + 1, dtype=np.int32)
    np.cumsum([len(u) for u in units], out=offsets[1:])
    values = np.concatenate(units).astype(np.int64) if units else np.zeros(0, dtype=np.int64)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


def _row_columns(decoded: list[Decoded], units: list[np.ndarray], with_alignments: bool) -> dict[str, Any]:
    columns: dict[str, Any] = {
        "ID": [d.row.id for d in decoded],
        "transcript": [d.row.text or "" for d in decoded],
        "speech_tokens": _list_array(units),
    }
    if with_alignments:
        for name, part in (("tokenized", 0), ("aligned_token_start_time", 1), ("aligned_token_end_time", 2)):
            columns[name] = [d.row.alignment[part] if d.row.alignment else [] for d in decoded]
    return columns


@dataclass
class ShardStats:
    rows: int = 0
    audio_seconds: float = 0.0
    frames: int = 0
    wall_seconds: float = 0.0

    def footer(self) -> dict[str, Any]:
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in asdict(self).items()}


def encode_rows(
    source: AudioSource,
    rows: range,
    encoder: UnitEncoder,
    settings: RunSettings,
    writer: ShardWriter,
    desc: str,
) -> tuple[ShardStats, list[dict[str, Any]]]:
    """Encode `rows` of the source into `writer` in split order; returns the counts and the skipped rows."""
    sampling_rate = encoder.preset.sampling_rate
    exact: Callable[[int], bool] = encoder.padding_exact if settings.batch.exact else (lambda n: True)
    max_samples = int(settings.batch.seconds * sampling_rate)
    stats, skipped = ShardStats(), []
    progress = AudioProgress(len(rows), desc, settings.progress)
    start = time.monotonic()
    try:
        chunks = read_chunks(
            source, rows, sampling_rate, encoder.min_samples, settings.chunk_rows, settings.num_workers
        )
        for chunk in chunks:
            good = usable(chunk, source.name, settings.on_bad_audio, skipped)
            units = run_batched([d.wave for d in good], encoder.encode, max_samples, settings.batch.max_rows, exact)
            writer.write(_row_columns(good, units, source.has_alignments))
            seconds = sum(len(d.wave) for d in good) / sampling_rate
            stats.rows += len(good)
            stats.audio_seconds += seconds
            stats.frames += sum(len(u) for u in units)
            progress.update(len(chunk), seconds)
    finally:
        progress.close()
    stats.wall_seconds = time.monotonic() - start
    return stats, skipped


def encode_audio(cfg: DictConfig) -> dict[str, Any]:
    """Encode this process's shard (skipped when done), refresh the manifest, and return the manifest."""
    encoder_cfg = select(cfg, "encoder") or {}
    EncoderPreset.from_config(encoder_cfg).refuse_if_unsupported()
    spec, columns = source_spec(cfg)
    settings = run_settings(cfg)
    shard, num_shards, how = resolve_shard(select(cfg, "shard"), select(cfg, "num_shards"), os.environ)
    out = EncodedOutput(Path(str(required(cfg, "output_dir"))))
    final = out.shard_path(spec.split, shard, num_shards)
    device, dtype = device_and_dtype(cfg)
    encoder = build_encoder(encoder_cfg, device, dtype)
    identity = encoder.identity()
    split_settings = {
        "source": spec.source,
        "source_config": spec.config,
        "source_revision": spec.revision,
        "source_split": spec.split,
        "columns": asdict(columns),
        "on_bad_audio": settings.on_bad_audio,
        "exact_batching": settings.batch.exact,
    }
    out.check(identity, spec.split, split_settings, num_shards)
    out.remove_dead_partials()
    label = f"{spec.split} shard {shard}/{num_shards}"
    if final.exists():
        LOGGER.info("%s (%s) is already encoded in %s: skipping", label, how, final)
    else:
        source = load_audio_source(spec, columns)
        rows = shard_range(len(source), shard, num_shards)
        LOGGER.info(
            "%s (%s): rows %d..%d of %d, %s on %s",
            label,
            how,
            rows.start,
            rows.stop,
            len(source),
            encoder.preset.name,
            device,
        )
        with out.write_shard(final, output_schema(source.has_alignments)) as writer:
            stats, skipped = encode_rows(source, rows, encoder, settings, writer, label)
            writer.set_footer(
                {
                    "encoder": identity,
                    "settings": split_settings,
                    "shard": shard,
                    "num_shards": num_shards,
                    **stats.footer(),
                    "skipped": len(skipped),
                    "skipped_rows": skipped[:MAX_SKIPS_IN_FOOTER],
                    "versions": encode_versions(),
                }
            )
        LOGGER.info(
            "%s: %d utterances (%d skipped), %.2f h audio, %d frames in %.1f s: %.0fx real time -> %s",
            label, stats.rows, len(skipped), stats.audio_seconds / 3600, stats.frames, stats.wall_seconds,
            stats.audio_seconds / max(stats.wall_seconds, 1e-9), final,
        )  # fmt: skip
    manifest = out.update_manifest()
    entry = manifest["splits"][spec.split]
    LOGGER.info(
        "%s: split %r has %d of %d shards (%d rows, %.2f h audio)%s",
        out.root, spec.split, entry["shards_done"], entry["num_shards"], entry["rows"], entry["audio_hours"],
        "" if entry["complete"] else "; the data presets refuse it until every shard is done",
    )  # fmt: skip
    return manifest
