"""An encoded dataset on disk: parquet shards in the MLS schema and the `encoding.json` manifest.

    <output_dir>/encoding.json                               manifest (derived from the shards' footers)
    <output_dir>/data/<split>-<shard:05d>-of-<num:05d>.parquet

The shard names follow the hub's sharded-split convention, so `load_dataset(<output_dir>, split=...)`, and
through it every data preset, reads the folder as it is. Each shard is written under `.partial/` and renamed
into place when complete, with what made it (encoder identity, source settings, counts, versions) in its
parquet footer. The shards are the truth: the manifest is rebuilt from their footers (under a file lock) after
every shard, so concurrent Slurm tasks never lose each other's records, and a re-run that finds its shard
done only refreshes it. A re-run with another encoder or source configuration is refused, naming what changed.

A writer holds an exclusive `flock` on its partial file for as long as it writes; the kernel (and the NFS or
parallel file system's lock manager, across nodes) drops it when the process dies, SIGKILL included. So a
partial file nobody holds a lock on belongs to a dead writer: every run starts by deleting those
(`remove_dead_partials`), while partial files of live writers, on this node or another, are kept. Creating and
locking a partial file, and testing and deleting one, both happen under the folder's lock, so a cleaner never
sees a new file before its writer has locked it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ssi.encode import EncodeError
from ssi.encode.encoders import LOCATION_FIELDS
from ssi.files import atomic_write_json

LOGGER = logging.getLogger(__name__)
MANIFEST_NAME = "encoding.json"  # an encoded folder's manifest (docs/encoding.md, "Outputs"); ssi.data reads it
MANIFEST_FORMAT = "ssi-encoding/1"
DATA_DIR = "data"
PARTIAL_DIR = ".partial"
LOCK_NAME = ".encoding.lock"
FOOTER_KEY = "ssi_encoding"
MAX_LISTED_SKIPS = 100
_SHARD_NAME = re.compile(r"^(?P<split>\w+(?:\.\w+)*)-(?P<shard>\d{5})-of-(?P<num>\d{5})\.parquet$")


def output_schema(with_alignments: bool) -> pa.Schema:
    """The published MLS DSU schema (docs/data.md); word alignments only when the source has them."""
    fields = [("ID", pa.string()), ("transcript", pa.string()), ("speech_tokens", pa.list_(pa.int64()))]
    if with_alignments:
        fields += [
            ("tokenized", pa.list_(pa.string())),
            ("aligned_token_start_time", pa.list_(pa.float64())),
            ("aligned_token_end_time", pa.list_(pa.float64())),
        ]
    return pa.schema(fields)


@dataclass(frozen=True)
class ShardFile:
    split: str
    shard: int
    num_shards: int
    path: Path


def differences(before: dict[str, Any], now: dict[str, Any], prefix: str) -> list[str]:
    return [
        f"{prefix}{key}: {before.get(key)!r} (there) != {now.get(key)!r} (now)"
        for key in sorted(set(before) | set(now))
        if before.get(key) != now.get(key)
    ]


def _unit_defining(identity: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in identity.items() if k not in LOCATION_FIELDS}


class EncodedOutput:
    """One output folder: its shards, their footers, the configuration check and the manifest."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise EncodeError(f"output_dir={self.root} exists and is not a folder")

    def shard_path(self, split: str, shard: int, num_shards: int) -> Path:
        if not re.fullmatch(r"\w+(?:\.\w+)*", split):
            raise EncodeError(f"split {split!r}: use letters, digits, '_' and '.' only (it names the shard files)")
        return self.root / DATA_DIR / f"{split}-{shard:05d}-of-{num_shards:05d}.parquet"

    def shards(self) -> list[ShardFile]:
        found = []
        for path in sorted((self.root / DATA_DIR).glob("*.parquet")):
            match = _SHARD_NAME.match(path.name)
            if match:
                found.append(ShardFile(match["split"], int(match["shard"]), int(match["num"]), path))
        return found

    @staticmethod
    def footer(path: Path) -> dict[str, Any]:
        try:
            metadata = pq.read_metadata(path).metadata or {}
            return json.loads(metadata[FOOTER_KEY.encode()])
        except (KeyError, OSError, pa.ArrowInvalid, json.JSONDecodeError) as err:
            raise EncodeError(
                f"{path}: not a shard written by scripts/encode_audio.py ({type(err).__name__}: {err})"
            ) from None

    def check(self, identity: dict[str, Any], split: str, settings: dict[str, Any], num_shards: int) -> None:
        """Refuse to add to a folder encoded otherwise: another encoder, or this split from another source or
        into another number of shards."""
        problems: list[str] = []
        for shard in self.shards():
            footer = self.footer(shard.path)
            problems += differences(_unit_defining(footer["encoder"]), _unit_defining(identity), "encoder.")
            if shard.split == split:
                problems += differences(footer["settings"], settings, "")
                if shard.num_shards != num_shards:
                    problems.append(f"num_shards: {shard.num_shards} (there) != {num_shards} (now)")
            if problems:
                raise EncodeError(
                    f"output_dir={self.root} holds {shard.path.name}, encoded with another configuration: "
                    + "; ".join(dict.fromkeys(problems))
                    + ". Encode into a new output_dir, or delete this one to start over"
                )

    @contextlib.contextmanager
    def write_shard(self, final: Path, schema: pa.Schema) -> Iterator[ShardWriter]:
        """A writer whose file appears at `final` only when the block completes (then with the footer set)."""
        partial = self.root / PARTIAL_DIR
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = partial / f"{final.name}.tmp-{socket.gethostname()}-{os.getpid()}"
        with self._lock():
            partial.mkdir(parents=True, exist_ok=True)
            held = open(tmp, "wb")  # noqa: SIM115 (held open, and locked, until the shard is in place)
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        writer = ShardWriter(tmp, schema)
        try:
            yield writer
            writer.close()
            os.replace(tmp, final)
        finally:
            writer.close()
            tmp.unlink(missing_ok=True)
            held.close()

    def remove_dead_partials(self) -> list[Path]:
        """Delete the partial files of writers that are no longer alive (no one holds their lock); returns them."""
        partial = self.root / PARTIAL_DIR
        if not partial.is_dir():
            return []
        removed = []
        with self._lock():
            for path in sorted(partial.iterdir()):
                try:
                    with open(path, "rb") as handle:
                        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        path.unlink()
                except BlockingIOError:
                    continue  # a live writer holds it
                except FileNotFoundError:
                    continue  # its writer just finished
                removed.append(path)
        for path in removed:
            LOGGER.warning("removed %s, left by an encoding that was killed", path)
        return removed

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / LOCK_NAME, "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def update_manifest(self) -> dict[str, Any]:
        """Rebuild encoding.json from every shard's footer; returns it."""
        with self._lock():
            footers = [(shard, self.footer(shard.path)) for shard in self.shards()]
            if not footers:
                raise EncodeError(f"{self.root}: no shards to describe")
            encoder = footers[0][1]["encoder"]
            splits: dict[str, dict[str, Any]] = {}
            versions: dict[str, dict[str, str]] = {}
            for shard, footer in footers:
                mismatch = differences(_unit_defining(encoder), _unit_defining(footer["encoder"]), "encoder.")
                if mismatch:
                    raise EncodeError(f"{shard.path}: encoded with another encoder than the other shards: {mismatch}")
                entry = splits.setdefault(
                    shard.split,
                    {**footer["settings"], "num_shards": shard.num_shards, "shards_done": 0, "rows": 0,
                     "audio_seconds": 0.0, "frames": 0, "skipped": 0, "skipped_rows": [], "files": []},
                )  # fmt: skip
                entry["shards_done"] += 1
                for key in ("rows", "audio_seconds", "frames", "skipped"):
                    entry[key] += footer[key]
                room = MAX_LISTED_SKIPS - len(entry["skipped_rows"])
                entry["skipped_rows"] += footer["skipped_rows"][: max(room, 0)]
                entry["files"].append(str(shard.path.relative_to(self.root)))
                versions[shard.path.name] = footer["versions"]
            for entry in splits.values():
                entry["complete"] = entry["shards_done"] == entry["num_shards"]
                entry["audio_hours"] = round(entry.pop("audio_seconds") / 3600, 6)
            distinct = {json.dumps(v, sort_keys=True) for v in versions.values()}
            manifest = {
                "format": MANIFEST_FORMAT,
                "encoder": encoder,
                "splits": splits,
                "versions": next(iter(versions.values())) if len(distinct) == 1 else versions,
            }
            atomic_write_json(self.root / MANIFEST_NAME, manifest, overwrite=True)
            return manifest


class ShardWriter:
    """Row groups of one shard, appended in split order; the footer is set before closing."""

    def __init__(self, path: Path, schema: pa.Schema) -> None:
        self.schema = schema
        self._writer: pq.ParquetWriter | None = pq.ParquetWriter(str(path), schema)

    def write(self, columns: dict[str, Any]) -> None:
        assert self._writer is not None
        self._writer.write_table(pa.table(columns, schema=self.schema))

    def set_footer(self, footer: dict[str, Any]) -> None:
        assert self._writer is not None
        self._writer.add_key_value_metadata({FOOTER_KEY: json.dumps(footer, ensure_ascii=False)})

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
