"""Score a generations.jsonl: `wer.json` (and, on request, per-utterance errors) beside it, and the
`scripts/wer.py` command line.

`score_generations` reads the hypotheses, takes references from the lines' `reference` fields or from
a dataset (`ssi.eval.references`), computes the WER (`ssi.eval.wer`) and writes `wer.json` atomically
(docs/run_directory.md lists its fields). Dataset, split, epoch and step are read from the file's place
in a run directory when it has one.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from ssi import report_error, run_dir, setup_cli_logging
from ssi.eval.references import DEFAULT_ID_COLUMNS, DEFAULT_TEXT_COLUMN, load_references, read_generations
from ssi.eval.wer import NORMALIZERS, UtteranceErrors, WerInputError, compute_wer
from ssi.files import atomic_write_json, atomic_write_text
from ssi.versions import package_versions

log = logging.getLogger(__name__)

WER_JSON = run_dir.WER_FILE
PER_UTTERANCE_JSONL = "wer_per_utterance.jsonl"
_MAX_LISTED_IDS = 5


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
    final_path: str | Path | None = None,
) -> dict[str, Any]:
    """Score a generations.jsonl and write `wer.json` (and `wer_per_utterance.jsonl`) beside it.

    References come from the lines' `reference` fields unless `references` names a file/dataset.
    `dataset`/`split` default to what the run layout says. `final_path` is where the file will be once its
    folder is renamed into place (generation scores inside the temporary folder, so that a folder in place
    is always scored): the run layout and the paths in wer.json are read from it. Returns wer.json's dict.
    """
    t0 = time.perf_counter()
    path = Path(generations_path)
    final = Path(final_path) if final_path is not None else path
    if normalizer not in NORMALIZERS:
        raise ValueError(f"unknown normalizer {normalizer!r}; expected one of {NORMALIZERS}")
    if not path.is_file():  # before refusing to overwrite its outputs: a wrong path is the first thing to say
        raise WerInputError(f"{path} is not a file (expected a generations.jsonl)")
    wer_path = path.parent / WER_JSON
    per_utterance_path = path.parent / PER_UTTERANCE_JSONL if per_utterance else None
    for out in (wer_path, per_utterance_path):
        if out is not None and out.exists() and not overwrite:
            raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    if per_utterance_path is None and (path.parent / PER_UTTERANCE_JSONL).exists():
        log.warning("%s is from an earlier scoring; this run does not update it", path.parent / PER_UTTERANCE_JSONL)

    location = run_dir.locate_generations(final)
    dataset = dataset if dataset is not None else (location.dataset if location else None)
    split = split if split is not None else (location.split if location else None)

    generations = read_generations(path)
    if references is None:
        ref_source = f"{final.absolute()} ('reference' field)"
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
        "generations": str(final.absolute()),
        "references": ref_source,
        "id_column": id_column if references is not None else "id",
        "text_column": text_column if references is not None else "reference",
        "n_hypotheses_without_reference": len(no_reference),
        "n_references_without_hypothesis": len(no_hypothesis),
        "per_utterance": str((final.parent / PER_UTTERANCE_JSONL).absolute()) if per_utterance_path else None,
        "versions": package_versions(("rapidfuzz", "whisper-normalizer")),
        "scored_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    # Per-utterance file first: a wer.json on disk then always comes with everything it points to.
    if per_utterance_path is not None:
        atomic_write_text(per_utterance_path, _per_utterance_jsonl(result.utterances), overwrite)
    atomic_write_json(wer_path, summary, overwrite)
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
        return report_error(err)
    print(format_summary(summary))
    return 0
