"""Word error rate of generated transcripts, matched to their references by utterance id.

`score_generations` reads a `generations.jsonl` (design.md section 3), takes references from its
`reference` fields or from a dataset/file, normalises both sides once per distinct string
(whisper-normalizer, optionally over several processes: it dominates the run time), aligns each
pair with the Levenshtein engine jiwer itself uses (rapidfuzz; same counts as jiwer, a few times
faster) and writes `wer.json` (plus, on request, per-utterance errors sorted worst first)
atomically beside the input. `python scripts/wer.py --help` is the CLI.

Matching is by id, never by line order, and every inconsistency (bad JSON line, missing field,
duplicate id, hypotheses without references or the reverse) is an error naming the line or id,
because a silently mis-paired WER looks plausible and is worthless.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import functools
import glob
import importlib.metadata
import json
import logging
import math
import multiprocessing
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rapidfuzz.distance import Levenshtein
from tqdm import tqdm

from ssi import setup_cli_logging

log = logging.getLogger(__name__)

NORMALIZERS = ("whisper", "basic", "none")
WER_JSON = "wer.json"
PER_UTTERANCE_JSONL = "wer_per_utterance.jsonl"
DEFAULT_ID_COLUMNS = ("ID", "id")
DEFAULT_TEXT_COLUMN = "transcript"
# Below this many distinct strings, starting worker processes costs more than it saves.
_PARALLEL_MIN_STRINGS = 5000
_PARALLEL_CHUNK = 500
_GENERATIONS_LAYOUT = re.compile(r"^epoch_(\d+)/global_step_(\d+)/([^/]+)/([^/]+)/[^/]+$")
_JSONL_SUFFIXES = (".jsonl", ".json")
_MAX_LISTED_IDS = 5


class WerInputError(ValueError):
    """Generations or references that cannot be scored as given; the message names the file, line or id."""


# --- inputs ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Generation:
    """One hypothesis of a generations.jsonl; `reference` is None when the line carries none."""

    id: str
    text: str
    reference: str | None


@dataclass(frozen=True)
class RunLocation:
    """Where a generations file sits in a run directory (design.md section 3)."""

    epoch: int
    global_step: int
    dataset: str
    split: str


def infer_run_location(path: Path) -> RunLocation | None:
    """Parse `.../epoch_<E>/global_step_<S>/<dataset>/<split>/<file>`; None for files elsewhere."""
    tail = "/".join(Path(path).absolute().parts[-5:])
    match = _GENERATIONS_LAYOUT.match(tail)
    if match is None:
        return None
    epoch, step, dataset, split = match.groups()
    return RunLocation(epoch=int(epoch), global_step=int(step), dataset=dataset, split=split)


def _as_id(value: Any, where: str) -> str:
    # Ids are compared as strings so an int id in one source matches the same id written as text in another.
    if isinstance(value, str) and value:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise WerInputError(f"{where}: id {value!r} is not a non-empty string or an integer")


def _iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line; a line that is not a JSON object is an error."""
    with open(path, "rb") as f:  # bytes, so an encoding error can name its line
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise WerInputError(f"{path}:{number}: not UTF-8 ({err.reason} at byte {err.start})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise WerInputError(f"{path}:{number}: malformed JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(obj, dict):
                raise WerInputError(f"{path}:{number}: expected a JSON object, got {type(obj).__name__}")
            yield number, obj


def read_generations(path: Path) -> list[Generation]:
    """Every line of a generations.jsonl, validated: `id` and `text` present, ids unique."""
    path = Path(path)
    if not path.is_file():
        raise WerInputError(f"{path} is not a file (expected a generations.jsonl)")
    generations: list[Generation] = []
    first_line: dict[str, int] = {}
    for number, obj in _iter_jsonl(path):
        where = f"{path}:{number}"
        if "id" not in obj:
            raise WerInputError(f"{where}: missing 'id'")
        uid = _as_id(obj["id"], where)
        where = f"{where} (id {uid!r})"
        if "text" not in obj:
            raise WerInputError(f"{where}: missing 'text'")
        if not isinstance(obj["text"], str):
            raise WerInputError(f"{where}: 'text' is {type(obj['text']).__name__}, expected a string")
        reference = obj.get("reference")
        if reference is not None and not isinstance(reference, str):
            raise WerInputError(f"{where}: 'reference' is {type(reference).__name__}, expected a string")
        if uid in first_line:
            raise WerInputError(f"{where}: duplicate id, first seen on line {first_line[uid]}")
        first_line[uid] = number
        generations.append(Generation(id=uid, text=obj["text"], reference=reference))
    if not generations:
        raise WerInputError(f"{path} holds no generations")
    return generations


def _pick_id_column(columns: Sequence[str], id_column: str | None, source: str) -> str:
    if id_column is not None:
        return id_column
    for name in DEFAULT_ID_COLUMNS:
        if name in columns:
            return name
    raise WerInputError(
        f"{source}: no id column: none of {list(DEFAULT_ID_COLUMNS)} in columns {list(columns)}; "
        "name it with --id-column"
    )


def _check_columns(columns: Sequence[str], wanted: Sequence[str], source: str) -> None:
    missing = [c for c in wanted if c not in columns]
    if missing:
        raise WerInputError(f"{source}: missing column(s) {missing}; available: {list(columns)}")


def _add_reference(refs: dict[str, str], raw_id: Any, text: Any, where: str, text_column: str) -> None:
    """Add one (id, transcript) pair to `refs`, refusing duplicate ids and non-string transcripts."""
    uid = _as_id(raw_id, where)
    if not isinstance(text, str):
        raise WerInputError(f"{where} (id {uid!r}): {text_column!r} is {type(text).__name__}, expected a string")
    if uid in refs:
        raise WerInputError(f"{where}: duplicate reference id {uid!r}")
    refs[uid] = text


def _add_columns(refs: dict[str, str], ids: Sequence[Any], texts: Sequence[Any], source: str, text_column: str) -> None:
    for row, (raw_id, text) in enumerate(zip(ids, texts, strict=True)):
        _add_reference(refs, raw_id, text, f"{source}, row {row}", text_column)


def _references_from_jsonl(path: Path, id_column: str | None, text_column: str, refs: dict[str, str]) -> None:
    for number, obj in _iter_jsonl(path):
        where = f"{path}:{number}"
        column = _pick_id_column(list(obj), id_column, where)
        _check_columns(list(obj), [column, text_column], where)
        _add_reference(refs, obj[column], obj[text_column], where, text_column)


def _references_from_parquet(path: Path, id_column: str | None, text_column: str, refs: dict[str, str]) -> None:
    import pyarrow.parquet as pq

    names = pq.read_schema(path).names
    column = _pick_id_column(names, id_column, str(path))
    _check_columns(names, [column, text_column], str(path))
    # Read only the two columns: DSU datasets carry large speech_tokens lists that scoring never needs.
    table = pq.read_table(path, columns=[column, text_column])
    _add_columns(refs, table.column(column).to_pylist(), table.column(text_column).to_pylist(), str(path), text_column)


def _references_from_datasets(
    source: str, split: str | None, id_column: str | None, text_column: str
) -> dict[str, str]:
    import datasets

    path = Path(source)
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        loaded = datasets.load_from_disk(str(path))
    else:
        # A hub id, or a local folder of data files; `datasets` resolves both.
        try:
            loaded = datasets.load_dataset(source) if split is None else datasets.load_dataset(source, split=split)
        except (ValueError, FileNotFoundError, ConnectionError) as err:
            raise WerInputError(f"cannot load references from {source!r} (split {split!r}): {err}") from err
    if isinstance(loaded, datasets.DatasetDict):
        if split is None:
            raise WerInputError(
                f"{source} has splits {sorted(loaded)}; choose one with --split "
                "(it is inferred only for generations in the run layout)"
            )
        if split not in loaded:
            raise WerInputError(f"{source} has no split {split!r}; available: {sorted(loaded)}")
        loaded = loaded[split]
    column = _pick_id_column(loaded.column_names, id_column, source)
    _check_columns(loaded.column_names, [column, text_column], source)
    table = loaded.select_columns([column, text_column])
    refs: dict[str, str] = {}
    _add_columns(refs, table[column], table[text_column], source, text_column)
    return refs


def load_references(
    source: str | Path,
    *,
    split: str | None = None,
    id_column: str | None = None,
    text_column: str = DEFAULT_TEXT_COLUMN,
) -> dict[str, str]:
    """id -> reference transcript from jsonl/parquet files (path or glob), a save_to_disk folder or a hub id.

    `id_column` None takes the first of `ID`/`id` present (the MLS DSU schema uses `ID`).
    """
    source = str(source)
    path = Path(source)
    if path.suffix in (*_JSONL_SUFFIXES, ".parquet") and not path.exists() and not glob.has_magic(source):
        raise WerInputError(f"reference file {source} does not exist")
    if path.is_file() or (not path.exists() and glob.has_magic(source)):
        files = [path] if path.is_file() else [Path(p) for p in sorted(glob.glob(source))]
        if not files:
            raise WerInputError(f"no files match {source}")
        refs: dict[str, str] = {}
        for file in files:
            if file.suffix == ".parquet":
                _references_from_parquet(file, id_column, text_column, refs)
            elif file.suffix in _JSONL_SUFFIXES:
                _references_from_jsonl(file, id_column, text_column, refs)
            else:
                raise WerInputError(f"{file}: unsupported reference file type; expected .jsonl, .json or .parquet")
    else:
        refs = _references_from_datasets(source, split, id_column, text_column)
    if not refs:
        raise WerInputError(f"{source} holds no references")
    return refs


# --- normalisation ---------------------------------------------------------------------------------


def _identity(text: str) -> str:
    return text


@functools.cache
def get_normalizer(name: str) -> Callable[[str], str]:
    """whisper = whisper-normalizer's EnglishTextNormalizer, basic = its BasicTextNormalizer, none = as is."""
    if name == "whisper":
        from whisper_normalizer.english import EnglishTextNormalizer

        return EnglishTextNormalizer()
    if name == "basic":
        from whisper_normalizer.basic import BasicTextNormalizer

        return BasicTextNormalizer()
    if name == "none":
        return _identity
    raise ValueError(f"unknown normalizer {name!r}; expected one of {NORMALIZERS}")


def _normalize_chunk(name: str, texts: list[str]) -> list[str]:
    normalize = get_normalizer(name)
    return [normalize(t) for t in texts]


def default_workers() -> int:
    """CPUs this process may use (respects Slurm/taskset binding), at most 16 so a shared node is not flooded."""
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(available, 16))


def normalize_texts(
    texts: Sequence[str], normalizer: str = "whisper", *, workers: int | None = None, progress: bool = True
) -> list[str]:
    """Normalise each distinct string once (references and good hypotheses repeat); returns one per input.

    Whisper's English normaliser costs ~0.25 ms a string, so large sets are spread over `workers`
    processes (spawned, not forked: the caller may hold vLLM/torch threads).
    """
    get_normalizer(normalizer)  # fail on an unknown name before any work
    if normalizer == "none":
        return list(texts)
    unique = list(dict.fromkeys(texts))
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    chunks = [unique[i : i + _PARALLEL_CHUNK] for i in range(0, len(unique), _PARALLEL_CHUNK)]
    bar = tqdm(total=len(unique), unit="str", desc=f"normalising ({normalizer})", disable=not progress)
    normalized: list[str] = []
    with bar:
        if workers == 1 or len(unique) < _PARALLEL_MIN_STRINGS:
            for chunk in chunks:
                normalized.extend(_normalize_chunk(normalizer, chunk))
                bar.update(len(chunk))
        else:
            context = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
                for chunk, out in zip(
                    chunks, pool.map(_normalize_chunk, [normalizer] * len(chunks), chunks), strict=True
                ):
                    normalized.extend(out)
                    bar.update(len(chunk))
    mapping = dict(zip(unique, normalized, strict=True))
    return [mapping[t] for t in texts]


# --- scoring ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UtteranceErrors:
    """Edit counts of one utterance; `reference`/`hypothesis` are the normalised texts whose words were aligned."""

    id: str
    substitutions: int
    deletions: int
    insertions: int
    hits: int
    reference: str
    hypothesis: str

    @property
    def errors(self) -> int:
        return self.substitutions + self.deletions + self.insertions

    @property
    def reference_words(self) -> int:
        return self.substitutions + self.deletions + self.hits

    @property
    def wer(self) -> float:
        """errors / reference words; inf for insertions against an empty (normalised) reference."""
        if self.reference_words == 0:
            return math.inf if self.errors else 0.0
        return self.errors / self.reference_words


@dataclass(frozen=True)
class WerResult:
    """Corpus totals and per-utterance counts in input order."""

    wer: float
    substitutions: int
    deletions: int
    insertions: int
    hits: int
    utterances: list[UtteranceErrors]

    @property
    def reference_words(self) -> int:
        return self.substitutions + self.deletions + self.hits

    @property
    def hypothesis_words(self) -> int:
        return self.substitutions + self.insertions + self.hits


class _WordIds(dict):
    """Interns words as consecutive ints, shared by references and hypotheses (the encoding jiwer uses)."""

    def __missing__(self, word: str) -> int:
        self[word] = index = len(self)
        return index


def align_counts(reference: list[int], hypothesis: list[int]) -> tuple[int, int, int]:
    """(substitutions, deletions, insertions) of the alignment jiwer reports for these word sequences.

    jiwer 4 maps words to ints and reads the edit blocks of `rapidfuzz.distance.Levenshtein.opcodes`;
    those blocks are built from `Levenshtein.editops`, so counting the edit operations of the same int
    sequences gives jiwer's split of the distance into S/D/I (tests check this against jiwer itself)
    without jiwer's per-word Python objects, which cost most of its time at 100k utterances.
    """
    if reference == hypothesis:
        return 0, 0, 0
    tags = [op[0] for op in Levenshtein.editops(reference, hypothesis).as_list()]
    deletions, insertions = tags.count("delete"), tags.count("insert")
    return len(tags) - deletions - insertions, deletions, insertions


def compute_wer(
    ids: Sequence[str],
    references: Sequence[str],
    hypotheses: Sequence[str],
    *,
    normalizer: str = "whisper",
    workers: int | None = None,
    progress: bool = True,
) -> WerResult:
    """Normalise, split on whitespace, align each pair; corpus WER = (S + D + I) / (S + D + H), as jiwer's."""
    if not len(ids) == len(references) == len(hypotheses):
        raise ValueError(f"{len(ids)} ids, {len(references)} references and {len(hypotheses)} hypotheses")
    if not ids:
        raise WerInputError("empty reference set: nothing to score")
    texts = normalize_texts([*references, *hypotheses], normalizer, workers=workers, progress=progress)
    ref_texts, hyp_texts = texts[: len(ids)], texts[len(ids) :]
    if not any(t.strip() for t in ref_texts):
        raise WerInputError(
            f"empty reference set: all {len(ids)} references are empty after normalisation with {normalizer!r}, "
            "so WER is undefined"
        )
    word_ids = _WordIds()
    utterances = []
    subs = dels = ins = hits = 0
    # One pass, keeping no word lists: holding millions of them makes the cyclic GC the slowest part.
    for uid, ref, hyp in zip(ids, ref_texts, hyp_texts, strict=True):
        ref_words, hyp_words = ref.split(), hyp.split()
        s, d, i = align_counts([word_ids[w] for w in ref_words], [word_ids[w] for w in hyp_words])
        h = len(ref_words) - s - d
        utterances.append(UtteranceErrors(uid, s, d, i, h, " ".join(ref_words), " ".join(hyp_words)))
        subs, dels, ins, hits = subs + s, dels + d, ins + i, hits + h
    return WerResult(
        wer=(subs + dels + ins) / (subs + dels + hits),
        substitutions=subs,
        deletions=dels,
        insertions=ins,
        hits=hits,
        utterances=utterances,
    )


# --- outputs ---------------------------------------------------------------------------------------


def _atomic_write_text(path: Path, text: str, overwrite: bool) -> None:
    """Write beside `path` under a hidden name, then rename: readers never see a half-written file."""
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass --overwrite to replace it")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _per_utterance_jsonl(utterances: list[UtteranceErrors]) -> str:
    keyed = sorted(((-u.wer, -u.errors, u.id), u) for u in utterances)
    lines = []
    for (neg_wer, _, _), u in keyed:
        row = {
            "id": u.id,
            # JSON has no infinity: insertions against an empty (normalised) reference get wer null.
            "wer": None if math.isinf(neg_wer) else -neg_wer,
            "errors": u.errors,
            "reference_words": u.reference_words,
            "substitutions": u.substitutions,
            "deletions": u.deletions,
            "insertions": u.insertions,
            "hits": u.hits,
            "reference": u.reference,
            "hypothesis": u.hypothesis,
        }
        lines.append(json.dumps(row, ensure_ascii=False))
    return "\n".join(lines) + "\n"


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _list_ids(ids: list[str]) -> str:
    shown = ", ".join(repr(i) for i in ids[:_MAX_LISTED_IDS])
    return shown + (", ..." if len(ids) > _MAX_LISTED_IDS else "")


def score_generations(
    generations_path: str | Path,
    *,
    references: str | Path | None = None,
    dataset: str | None = None,
    split: str | None = None,
    normalizer: str = "whisper",
    id_column: str | None = None,
    text_column: str = DEFAULT_TEXT_COLUMN,
    per_utterance: bool = False,
    allow_missing: bool = False,
    overwrite: bool = False,
    workers: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Score a generations.jsonl and write `wer.json` (and `wer_per_utterance.jsonl`) beside it.

    References come from the lines' `reference` fields unless `references` names a file/dataset.
    `dataset`/`split` default to what the run layout says. Returns the dict written to wer.json.
    """
    t0 = time.perf_counter()
    path = Path(generations_path)
    if normalizer not in NORMALIZERS:
        raise ValueError(f"unknown normalizer {normalizer!r}; expected one of {NORMALIZERS}")
    wer_path = path.parent / WER_JSON
    per_utterance_path = path.parent / PER_UTTERANCE_JSONL if per_utterance else None
    for out in (wer_path, per_utterance_path):
        if out is not None and out.exists() and not overwrite:
            raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    if per_utterance_path is None and (path.parent / PER_UTTERANCE_JSONL).exists():
        log.warning("%s is from an earlier scoring; this run does not update it", path.parent / PER_UTTERANCE_JSONL)

    location = infer_run_location(path)
    dataset = dataset if dataset is not None else (location.dataset if location else None)
    split = split if split is not None else (location.split if location else None)

    generations = read_generations(path)
    if references is None:
        ref_source = f"{path.absolute()} ('reference' field)"
        refs = {g.id: g.reference for g in generations if g.reference is not None}
        if not refs:
            raise WerInputError(
                f"empty reference set: no line of {path} has a 'reference'; give references with --references"
            )
    else:
        ref_path = Path(references)
        ref_source = str(ref_path.absolute()) if ref_path.exists() else str(references)
        refs = load_references(references, split=split, id_column=id_column, text_column=text_column)
        if any(g.reference is not None for g in generations):
            log.info("ignoring the 'reference' fields of %s: references come from %s", path, ref_source)

    no_reference = [g.id for g in generations if g.id not in refs]
    hypothesis_ids = {g.id for g in generations}
    no_hypothesis = [uid for uid in refs if uid not in hypothesis_ids]
    if no_reference or no_hypothesis:
        problem = (
            f"{len(no_reference)} hypotheses in {path} have no reference"
            + (f" (ids {_list_ids(no_reference)})" if no_reference else "")
            + f" and {len(no_hypothesis)} references from {ref_source} have no hypothesis"
            + (f" (ids {_list_ids(no_hypothesis)})" if no_hypothesis else "")
        )
        if not allow_missing:
            raise WerInputError(f"{problem}; pass --allow-missing to score only the ids present in both")
        log.warning("%s; scoring the ids present in both", problem)
    scored = [g for g in generations if g.id in refs]
    if not scored:
        raise WerInputError(f"empty reference set: no id of {path} has a reference in {ref_source}")

    result = compute_wer(
        [g.id for g in scored],
        [refs[g.id] for g in scored],
        [g.text for g in scored],
        normalizer=normalizer,
        workers=workers,
        progress=progress,
    )
    summary: dict[str, Any] = {
        "wer": result.wer,
        "substitutions": result.substitutions,
        "deletions": result.deletions,
        "insertions": result.insertions,
        "hits": result.hits,
        "n_utterances": len(scored),
        "n_reference_words": result.reference_words,
        "n_hypothesis_words": result.hypothesis_words,
        "normalizer": normalizer,
        "dataset": dataset,
        "split": split,
        "epoch": location.epoch if location else None,
        "global_step": location.global_step if location else None,
        "generations": str(path.absolute()),
        "references": ref_source,
        "id_column": id_column if references is not None else "id",
        "text_column": text_column if references is not None else "reference",
        "n_hypotheses_without_reference": len(no_reference),
        "n_references_without_hypothesis": len(no_hypothesis),
        "per_utterance": str(per_utterance_path.absolute()) if per_utterance_path else None,
        "versions": {name: _package_version(name) for name in ("rapidfuzz", "whisper-normalizer")},
        "scored_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    # Per-utterance file first: a wer.json on disk then always comes with everything it points to.
    if per_utterance_path is not None:
        _atomic_write_text(per_utterance_path, _per_utterance_jsonl(result.utterances), overwrite)
    _atomic_write_text(wer_path, json.dumps(summary, indent=2, ensure_ascii=False) + "\n", overwrite)
    elapsed = time.perf_counter() - t0
    log.info("scored %d utterances in %.2f s (%.0f utterances/s)", len(scored), elapsed, len(scored) / elapsed)
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """The few lines a person reads after scoring: WER, its parts, and where the numbers went."""
    where = "/".join(str(summary[k]) for k in ("dataset", "split") if summary[k] is not None)
    lines = [
        f"WER {100 * summary['wer']:.2f}%"
        + (f" on {where}" if where else "")
        + f" ({summary['n_utterances']} utterances, {summary['n_reference_words']} reference words, "
        f"normalizer={summary['normalizer']})",
        f"  substitutions {summary['substitutions']}  deletions {summary['deletions']}  "
        f"insertions {summary['insertions']}  hits {summary['hits']}",
    ]
    skipped = summary["n_hypotheses_without_reference"] + summary["n_references_without_hypothesis"]
    if skipped:
        lines.append(
            f"  not scored: {summary['n_hypotheses_without_reference']} hypotheses without reference, "
            f"{summary['n_references_without_hypothesis']} references without hypothesis"
        )
    lines.append(f"  wrote {Path(summary['generations']).parent / WER_JSON}")
    if summary["per_utterance"]:
        lines.append(f"  wrote {summary['per_utterance']}")
    return "\n".join(lines)


# --- command line ----------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wer.py",
        description="Word error rate of a generations.jsonl; writes wer.json beside it.",
    )
    parser.add_argument("generations", type=Path, help="generations.jsonl (one JSON object per line: id, text, ...)")
    parser.add_argument(
        "--dataset", default=None, help="dataset name recorded in wer.json (default: from the run layout)"
    )
    parser.add_argument(
        "--split",
        default=None,
        help="split recorded in wer.json and read from --references datasets (default: from the run layout)",
    )
    parser.add_argument(
        "--normalizer",
        choices=NORMALIZERS,
        default="whisper",
        help="whisper = Whisper's English normaliser, basic = its language-agnostic one (default: %(default)s)",
    )
    parser.add_argument(
        "--references",
        default=None,
        help="jsonl/parquet file or glob, save_to_disk folder or hub dataset id holding the references "
        "(default: the 'reference' field of each line)",
    )
    parser.add_argument(
        "--id-column",
        "--id_column",
        default=None,
        help=f"id column of --references (default: first of {', '.join(DEFAULT_ID_COLUMNS)})",
    )
    parser.add_argument(
        "--text-column",
        "--text_column",
        default=DEFAULT_TEXT_COLUMN,
        help="transcript column of --references (default: %(default)s)",
    )
    parser.add_argument(
        "--per-utterance",
        "--per_utterance",
        action="store_true",
        help=f"also write {PER_UTTERANCE_JSONL}, worst utterance first",
    )
    parser.add_argument(
        "--allow-missing",
        "--allow_missing",
        action="store_true",
        help="score the ids present on both sides instead of refusing when some lack a partner",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing wer.json / per-utterance file")
    parser.add_argument(
        "--workers",
        type=_positive_int,
        default=None,
        help="processes for text normalisation (default: usable CPUs, at most 16)",
    )
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_cli_logging()
    try:
        summary = score_generations(
            args.generations,
            references=args.references,
            dataset=args.dataset,
            split=args.split,
            normalizer=args.normalizer,
            id_column=args.id_column,
            text_column=args.text_column,
            per_utterance=args.per_utterance,
            allow_missing=args.allow_missing,
            overwrite=args.overwrite,
            workers=args.workers,
            progress=args.progress,
        )
    except (WerInputError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    return 0
