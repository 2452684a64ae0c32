"""Where samples come from and whether they can be trusted (docs/data.md).

A source is a hub dataset id, a `save_to_disk` folder, a folder of split-named data files, or local
jsonl/parquet files (a path or glob; several files merge; `{split}` in the path is replaced by the split
name). A folder sharded as `data/<split>-<i>-of-<n>.*` (what scripts/encode_audio.py writes) is read only
once all n shards of the split are there. Word alignments are optional (ASR test sets have none): a source
has all three alignment columns or none. Validation runs once, vectorised over Arrow batches, before any
training step: a bad row stops the run with the sample id, column and value, instead of surfacing as a
silent shift of speech against text hours later.
"""

from __future__ import annotations

import glob
import logging
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ssi.locations import hub_failure_message, looks_local, missing_path_message
from ssi.vocab.layout import SpeechVocab

LOGGER = logging.getLogger(__name__)

STREAM_SHUFFLE_BUFFER = 10_000
_DATA_SUFFIXES = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}
_GLOB_CHARS = set("*?[")


class DataValidationError(ValueError):
    """A sample or source that does not match the schema; the message names sample id, column and value."""


class MissingSplitError(DataValidationError):
    """A source without the split a preset section asks for (a corpus with train and test only)."""


@dataclass(frozen=True)
class ColumnNames:
    """Names of the schema columns in a source (defaults: the published MLS DSU datasets)."""

    id: str = "ID"
    transcript: str = "transcript"
    words: str = "tokenized"
    start: str = "aligned_token_start_time"
    end: str = "aligned_token_end_time"
    speech: str = "speech_tokens"

    def all(self) -> list[str]:
        return [getattr(self, f.name) for f in fields(self)]

    def required(self) -> list[str]:
        """The columns every source has; the word alignments (`alignment`) are optional."""
        return [self.id, self.transcript, self.speech]

    def alignment(self) -> list[str]:
        """Words and their start/end times: only interleaved CPT needs them."""
        return [self.words, self.start, self.end]


@dataclass(frozen=True)
class Encoder:
    """The DSU encoder a dataset was made with: how many units, and how many frames per second."""

    name: str
    n_units: int
    sampling_rate: int
    downsampling_ratio: int

    def __post_init__(self) -> None:
        if self.n_units <= 0 or self.sampling_rate <= 0 or self.downsampling_ratio <= 0:
            raise DataValidationError(f"encoder {self.name!r}: n_units, sampling_rate, downsampling_ratio must be > 0")

    @classmethod
    def from_mapping(cls, enc: Mapping[str, Any]) -> Encoder:
        """From a preset's `encoder` section or an encoding.json's: name, n_units, sampling_rate, downsampling_ratio."""
        return cls(str(enc["name"]), int(enc["n_units"]), int(enc["sampling_rate"]), int(enc["downsampling_ratio"]))

    @property
    def fps(self) -> float:
        """Speech frames per second = sampling_rate / downsampling_ratio (HuBERT: 16000 / 320 = 50)."""
        return self.sampling_rate / self.downsampling_ratio

    def check_vocab(self, vocab: SpeechVocab) -> None:
        """Refuse a data preset that cannot fit the model: more units than DSU rows, or another frame rate."""
        if self.n_units > vocab.n_dsus:
            raise DataValidationError(
                f"encoder {self.name!r} has {self.n_units} units but the model manifest has n_dsus={vocab.n_dsus}: "
                "extend the model with at least that many DSUs or pick the matching data preset"
            )
        if self.n_units < vocab.n_dsus:
            LOGGER.warning(
                "encoder %r has %d units, the model has %d DSU rows: the remaining rows stay untrained",
                self.name,
                self.n_units,
                vocab.n_dsus,
            )
        if vocab.frame_rate is not None and abs(vocab.frame_rate - self.fps) > 1e-6:
            raise DataValidationError(
                f"encoder {self.name!r} runs at {self.fps} Hz but the model manifest records frame_rate="
                f"{vocab.frame_rate} Hz ({vocab.dsu_encoder or 'unnamed encoder'})"
            )
        if vocab.dsu_encoder is not None and vocab.dsu_encoder != self.name:
            LOGGER.warning("data encoder %r differs from the model manifest's %r", self.name, vocab.dsu_encoder)


@dataclass(frozen=True)
class SourceSpec:
    """One split of one source, as written under `data.<split>.dataset` in a preset."""

    source: str
    split: str = "train"
    n_samples: int | None = None
    shuffle_seed: int | None = None

    def __post_init__(self) -> None:
        if self.n_samples is not None and self.n_samples <= 0:
            raise DataValidationError(f"{self.source}: n_samples must be positive or null, got {self.n_samples}")

    @property
    def resolved(self) -> str:
        return self.source.replace("{split}", self.split)


SourceKind = Literal["disk", "folder", "files", "hub"]


def source_kind(spec: SourceSpec) -> tuple[SourceKind, list[str]]:
    """Classify a source; for local files also return the sorted file list (an empty glob is an error)."""
    text = spec.resolved
    path = Path(text).expanduser()
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return "disk", [str(path)]
        return "folder", [str(path)]
    local = path.suffix in _DATA_SUFFIXES or any(c in text for c in _GLOB_CHARS) or looks_local(text)
    if not local:
        return "hub", [text]
    files = sorted(glob.glob(str(path)))
    if not files:
        if any(c in text for c in _GLOB_CHARS):
            raise DataValidationError(f"source {text!r}: no files match (split {spec.split!r})")
        raise DataValidationError(missing_path_message("source", text))
    kinds = {_DATA_SUFFIXES.get(Path(f).suffix) for f in files}
    if None in kinds or len(kinds) != 1:
        raise DataValidationError(
            f"source {text!r}: expected only .jsonl/.json or only .parquet files, "
            f"got {[Path(f).name for f in files[:5]]}"
        )
    return "files", files


def load_source(spec: SourceSpec, columns: ColumnNames) -> datasets.Dataset:
    """Load one split as a map-style `datasets.Dataset` restricted to the configured columns (the alignment
    columns only when the source has them: `has_alignments`)."""
    ds = load_rows(spec)
    check_columns(ds.column_names, columns, spec.resolved)
    return ds.select_columns([c for c in columns.all() if c in ds.column_names])


def has_alignments(ds: datasets.Dataset, columns: ColumnNames) -> bool:
    """Whether a source loaded by `load_source` carries word alignments."""
    return all(c in ds.column_names for c in columns.alignment())


def load_rows(spec: SourceSpec) -> datasets.Dataset:
    """Load one split of any source with all its columns (the speech schema is checked by `load_source`).

    With `n_samples`, hub/local-file sources are streamed and only the first N rows (after an optional
    seeded shuffle) are kept, so the rest is never downloaded or converted; a `save_to_disk` folder is
    memory-mapped, so selecting rows costs nothing there.
    """
    kind, files = source_kind(spec)
    LOGGER.info("loading %s split %r from %s source %s", spec.resolved, spec.split, kind, files[:3])
    if kind == "folder":
        check_shard_set(Path(files[0]), spec.split)
    if kind == "disk":
        loaded = datasets.load_from_disk(files[0])
        if isinstance(loaded, datasets.DatasetDict):
            if spec.split not in loaded:
                raise MissingSplitError(f"{files[0]}: no split {spec.split!r}; available splits: {sorted(loaded)}")
            loaded = loaded[spec.split]
        ds = _shuffle_and_head(loaded, spec)
    else:
        if kind == "files":
            builder, kwargs = _DATA_SUFFIXES[Path(files[0]).suffix], {"data_files": files, "split": "train"}
        else:
            builder, kwargs = files[0], {"split": spec.split}
        if spec.n_samples is None:
            ds = _shuffle_and_head(_load_dataset(builder, kind, spec, **kwargs), spec)
        else:
            stream = _load_dataset(builder, kind, spec, streaming=True, **kwargs)
            if spec.shuffle_seed is not None:
                stream = stream.shuffle(seed=spec.shuffle_seed, buffer_size=STREAM_SHUFFLE_BUFFER)
            rows = list(stream.take(spec.n_samples))
            if not rows:
                raise DataValidationError(f"{spec.resolved}: split {spec.split!r} is empty")
            ds = datasets.Dataset.from_list(rows, features=stream.features)
    return ds


def _load_dataset(builder: str, kind: SourceKind, spec: SourceSpec, **kwargs: Any) -> Any:
    """`datasets.load_dataset`, with a missing split and an unloadable hub id as one-line errors."""
    try:
        return datasets.load_dataset(builder, **kwargs)
    except ValueError as err:
        message = " ".join(str(err).split())
        if "Unknown split" in message or "Bad split" in message:
            available = message.split("Should be one of", 1)[-1].strip(" .") if "Should be one of" in message else "?"
            raise MissingSplitError(
                f"{spec.resolved}: no split {spec.split!r}; available splits: {available}"
            ) from None
        if kind == "hub":
            raise DataValidationError(hub_failure_message("source", spec.resolved, err)) from None
        raise
    except (FileNotFoundError, ConnectionError, OSError) as err:
        if kind == "hub":
            raise DataValidationError(hub_failure_message("source", spec.resolved, err)) from None
        raise


def _shuffle_and_head(ds: datasets.Dataset, spec: SourceSpec) -> datasets.Dataset:
    if spec.shuffle_seed is not None:
        ds = ds.shuffle(seed=spec.shuffle_seed)
    if spec.n_samples is not None and spec.n_samples < len(ds):
        ds = ds.select(range(spec.n_samples))
    return ds


def check_columns(available: list[str], columns: ColumnNames, source: str) -> None:
    """The required columns, and the alignment columns all or none (a partial set is a naming mistake)."""
    aligned = [c for c in columns.alignment() if c in available]
    wanted = columns.required() + (columns.alignment() if aligned else [])
    missing = [c for c in wanted if c not in available]
    if missing:
        raise DataValidationError(
            f"{source}: missing column(s) {missing}; available columns: {sorted(available)} "
            "(set data.columns.* to the names this dataset uses)"
        )


_SHARD_FILE = re.compile(r"^(?P<split>\w+(?:\.\w+)*)-(?P<index>\d{5})-of-(?P<count>\d{5})\.\w+$")


def check_shard_set(folder: Path, split: str) -> None:
    """Refuse a split of a `data/<split>-<i>-of-<n>` folder that lacks shards (an encoding still running or
    interrupted): reading it would silently train or evaluate on part of the data."""
    counts: dict[int, set[int]] = {}
    for path in (folder / "data").glob(f"{split}-*-of-*.*"):
        match = _SHARD_FILE.match(path.name)
        if match and match["split"] == split:
            counts.setdefault(int(match["count"]), set()).add(int(match["index"]))
    if len(counts) > 1:
        raise DataValidationError(f"{folder}: split {split!r} has shard files of {sorted(counts)} shards; keep one set")
    for count, present in counts.items():
        if len(present) != count:
            absent = sorted(set(range(count)) - present)
            raise DataValidationError(
                f"{folder}: split {split!r} has {len(present)} of {count} shards (missing {absent[:5]}"
                f"{'...' if len(absent) > 5 else ''}); finish the encoding (re-run it: done shards are skipped)"
            )


# --- validation ----------------------------------------------------------------------------------


@dataclass
class ValidationReport:
    """What validation saw and dropped; logged before training and printed by the inspection tool."""

    source: str
    n_rows: int = 0
    skipped: Counter = field(default_factory=Counter)
    skipped_ids: list[str] = field(default_factory=list)
    n_frames: int = 0
    n_words: int = 0

    @property
    def n_kept(self) -> int:
        return self.n_rows - sum(self.skipped.values())

    def summary(self, fps: float) -> str:
        hours = self.n_frames / fps / 3600
        skipped = ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items())) or "none"
        return (
            f"{self.source}: {self.n_kept}/{self.n_rows} samples kept ({hours:.2f} h of speech, "
            f"{self.n_words} words); skipped: {skipped}"
        )


def validate_dataset(
    ds: datasets.Dataset,
    columns: ColumnNames,
    n_dsus: int,
    fps: float,
    *,
    on_empty: Literal["skip", "fail"] = "skip",
    tolerance_frames: float = 1.0,
    source: str = "dataset",
    batch_size: int = 2048,
) -> tuple[datasets.Dataset, ValidationReport]:
    """Check every row against the schema; return the dataset without empty rows, and a report.

    Errors (always fatal): DSU ids outside [0, n_dsus); where the source has word alignments, also
    word/alignment length mismatch, start after end or negative times, and a word ending after the speech
    ends (more than `tolerance_frames` frames past the last frame; encoders drop a partial last frame).
    Empty speech or text is skipped and counted, or fatal with `on_empty="fail"`.
    """
    if on_empty not in ("skip", "fail"):
        raise DataValidationError(f"on_empty must be 'skip' or 'fail', got {on_empty!r}")
    check_columns(ds.column_names, columns, source)
    report = ValidationReport(source=source)
    drop: list[int] = []
    offset = 0
    for table in ds.with_format("arrow").iter(batch_size=batch_size):
        checker = _BatchChecker(table, columns, offset, source)
        empty = checker.empty_rows()
        for row, why in empty:
            if on_empty == "fail":
                raise DataValidationError(checker.where(row, why[1]) + f": {why[0]} (data.validation.on_empty=fail)")
            report.skipped[why[0]] += 1
            if len(report.skipped_ids) < 10:
                report.skipped_ids.append(checker.sample_id(row))
            drop.append(offset + row)
        keep = np.ones(table.num_rows, dtype=bool)
        keep[[row for row, _ in empty]] = False
        checker.check(keep, n_dsus, fps, tolerance_frames)
        report.n_rows += table.num_rows
        report.n_frames += int(checker.speech_len[keep].sum())
        report.n_words += int(checker.n_words[keep].sum())
        offset += table.num_rows
    if drop:
        LOGGER.warning(
            "%s: skipping %d empty samples %s (first ids %s)",
            source,
            len(drop),
            dict(report.skipped),
            report.skipped_ids[:5],
        )
        dropped = set(drop)
        ds = ds.select([i for i in range(len(ds)) if i not in dropped])
    LOGGER.info(report.summary(fps))
    return ds, report


def _chunk(table: pa.Table, name: str) -> pa.Array:
    return table.column(name).combine_chunks()


def _lengths(array: pa.Array) -> np.ndarray:
    return pc.fill_null(pc.list_value_length(array), 0).to_numpy(zero_copy_only=False).astype(np.int64)


def _first_flagged(flags: np.ndarray, row_of: np.ndarray) -> tuple[int, int, int]:
    """Flat index, row and position within the row of the first True in a flattened per-row array."""
    k = int(np.argmax(flags))
    row = int(row_of[k])
    return k, row, k - int(np.searchsorted(row_of, row))


class _BatchChecker:
    """Vectorised checks over one Arrow batch; rows are located only to build an error message."""

    def __init__(self, table: pa.Table, columns: ColumnNames, offset: int, source: str) -> None:
        self.table, self.columns, self.offset, self.source = table, columns, offset, source
        self.speech = _chunk(table, columns.speech)
        self.speech_len = _lengths(self.speech)
        self.aligned = all(c in table.column_names for c in columns.alignment())
        if self.aligned:
            self.words = _chunk(table, columns.words)
            self.start = _chunk(table, columns.start)
            self.end = _chunk(table, columns.end)
            self.n_words = _lengths(self.words)
        else:  # words of the transcript, for the statistics
            self.n_words = _lengths(pc.utf8_split_whitespace(_chunk(table, columns.transcript)))

    def sample_id(self, row: int) -> str:
        return str(self.table.column(self.columns.id)[row].as_py())

    def where(self, row: int, column: str) -> str:
        return f"{self.source}: sample {self.sample_id(row)!r} (row {self.offset + row}), column {column!r}"

    def empty_rows(self) -> list[tuple[int, tuple[str, str]]]:
        text = pc.fill_null(pc.utf8_length(pc.utf8_trim_whitespace(_chunk(self.table, self.columns.transcript))), 0)
        no_text = (text.to_numpy(zero_copy_only=False) == 0) | (self.n_words == 0)
        no_speech = self.speech_len == 0
        out = [(int(r), ("empty speech", self.columns.speech)) for r in np.flatnonzero(no_speech)]
        out += [(int(r), ("empty text", self.columns.transcript)) for r in np.flatnonzero(no_text & ~no_speech)]
        return sorted(out)

    def check(self, keep: np.ndarray, n_dsus: int, fps: float, tolerance_frames: float) -> None:
        self.check_units(keep, n_dsus)
        if self.aligned:
            self.check_alignments(keep, fps, tolerance_frames)

    def check_units(self, keep: np.ndarray, n_dsus: int) -> None:
        units = pc.list_flatten(self.speech).to_numpy(zero_copy_only=False)
        row_of_frame = np.repeat(np.arange(len(self.speech_len)), self.speech_len)
        bad_units = ((units < 0) | (units >= n_dsus)) & keep[row_of_frame]
        if bad_units.any():
            k, row, frame = _first_flagged(bad_units, row_of_frame)
            raise DataValidationError(
                self.where(row, self.columns.speech) + f": DSU id {int(units[k])} at frame {frame} is outside "
                f"[0, {n_dsus}) (n_dsus from the model manifest)"
            )

    def check_alignments(self, keep: np.ndarray, fps: float, tolerance_frames: float) -> None:
        cols = self.columns
        for name, array in ((cols.start, self.start), (cols.end, self.end)):
            lengths = _lengths(array)
            bad = np.flatnonzero(keep & (lengths != self.n_words))
            if bad.size:
                row = int(bad[0])
                raise DataValidationError(
                    self.where(row, name) + f": {lengths[row]} alignment times for {self.n_words[row]} words "
                    f"in {cols.words!r} (value {array[row].as_py()!r})"
                )
        starts = pc.list_flatten(self.start).to_numpy(zero_copy_only=False).astype(np.float64)
        ends = pc.list_flatten(self.end).to_numpy(zero_copy_only=False).astype(np.float64)
        row_of_word = np.repeat(np.arange(len(self.n_words)), self.n_words)
        bad_times = (starts > ends) | (starts < 0) | ~np.isfinite(starts) | ~np.isfinite(ends)
        bad_times &= keep[row_of_word]
        if bad_times.any():
            k, row, word_index = _first_flagged(bad_times, row_of_word)
            raise DataValidationError(
                self.where(row, cols.start) + f": word {word_index} has start {starts[k]} and end {ends[k]} "
                "(times must be finite, >= 0 and start <= end)"
            )
        rows = np.flatnonzero(self.n_words > 0)  # reduceat needs each row's first word: skip wordless rows
        if rows.size:
            firsts = np.concatenate([[0], np.cumsum(self.n_words)[:-1]])
            last_end = np.maximum.reduceat(ends, firsts[rows])
            over = (last_end * fps > self.speech_len[rows] + tolerance_frames) & keep[rows]
            if over.any():
                i = int(np.argmax(over))
                row = int(rows[i])
                raise DataValidationError(
                    self.where(row, cols.end) + f": a word ends at {last_end[i]:.3f} s = frame "
                    f"{last_end[i] * fps:.1f} at {fps:g} Hz, but the speech has {self.speech_len[row]} frames "
                    f"({self.speech_len[row] / fps:.3f} s); wrong encoder frame rate in the preset?"
                )
