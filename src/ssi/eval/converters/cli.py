"""`scripts/convert_benchmark.py <kind> ... --output items.jsonl`: one command per published benchmark form
(docs/evaluation.md, "Converters")."""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from ssi import report_error, setup_cli_logging
from ssi.eval.converters.blimp import blimp_items
from ssi.eval.converters.salmon import salmon_items
from ssi.eval.converters.storycloze import LAYOUTS, spoken_pairs, spoken_triplets, text_items
from ssi.eval.converters.synthetic import synthetic_items
from ssi.eval.converters.units import UnitsTable
from ssi.eval.converters.zerospeech import lexical_items, syntactic_items
from ssi.eval.items import SPEECH, TEXT, BenchmarkError, Item, write_items


def _units_options(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument(
        "--units",
        required=required,
        help="the audio's units: scripts/encode_audio.py output folder, or parquet/jsonl file(s) or glob with an "
        "id column (wav stem or relative path) and a units column",
    )
    parser.add_argument("--id_column", help="id column of the units table (default: ID, id, file, filename or path)")
    parser.add_argument("--units_column", help="units column of the units table (default: speech_tokens or units)")


def _table(args: argparse.Namespace) -> UnitsTable:
    return UnitsTable(args.units, args.id_column, args.units_column)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Convert a published benchmark into the items format of scripts/evaluate.py (docs/evaluation.md)."
    )
    kinds = parser.add_subparsers(dest="kind", required=True)
    for task in ("lexical", "syntactic"):
        sub = kinds.add_parser(
            f"zr2021-{task}", help=f"ZeroSpeech 2021 {task} ({'sWUGGY' if task == 'lexical' else 'sBLIMP'})"
        )
        sub.add_argument("--dataset", required=True, type=Path, help="ZR2021 dataset root (holds lexical/, syntactic/)")
        sub.add_argument(
            "--split", default="dev", choices=("dev", "test"), help="%(default)s (test gold is not public)"
        )
        _units_options(sub)
    sub = kinds.add_parser("spoken-storycloze", help="slp-rl spoken StoryCloze (sSC / tSC), or any story triplets")
    sub.add_argument("--root", required=True, type=Path, help="the folder of story files")
    sub.add_argument(
        "--layout", required=True, choices=LAYOUTS, help="pairs: whole stories; triplets: mutual/correct/incorrect"
    )
    sub.add_argument("--prefix", default=SPEECH, choices=(SPEECH, TEXT), help="triplets: modality of the prefix")
    sub.add_argument("--continuation", default=SPEECH, choices=(SPEECH, TEXT), help="triplets: of the endings")
    _units_options(sub, required=False)
    sub = kinds.add_parser("salmon", help="SALMon: one folder per task of sample_<i>_<0|1>.wav")
    sub.add_argument("--root", required=True, type=Path, help="the unzipped salmon_benchmark folder")
    sub.add_argument("--tasks", nargs="*", help="task folders to convert (default: every one found)")
    _units_options(sub)
    sub.add_argument_group().description = "--units may contain {task}: one table per task folder"
    sub = kinds.add_parser("storycloze-text", help="StoryCloze as text (ROCStories csv, or a hub dataset)")
    sub.add_argument("--source", required=True, help="csv/tsv/parquet/jsonl file, glob or folder, or a hub id")
    sub.add_argument("--config", help="hub config (e.g. en for juletxara/xstory_cloze)")
    sub.add_argument("--split", default="test", help="hub split (default: %(default)s)")
    sub.add_argument("--revision", help="hub revision (e.g. refs/convert/parquet)")
    sub = kinds.add_parser("blimp", help="BLiMP as text (nyu-mll/blimp, or its parquet files)")
    sub.add_argument(
        "--source", default="nyu-mll/blimp", help="hub id or local parquet/jsonl files (default: %(default)s)"
    )
    sub.add_argument("--category", default="linguistics_term", help="column used as category (default: %(default)s)")
    sub.add_argument("--revision", help="hub revision")
    sub = kinds.add_parser("synthetic", help="real vs run-shuffled continuations from a synthetic corpus (tests, demo)")
    sub.add_argument("--corpus", required=True, type=Path, help="scripts/make_synthetic_dataset.py output")
    sub.add_argument("--split", default="test", help="default: %(default)s")
    sub.add_argument("--n_items", type=int, help="at most this many items (default: one per utterance)")
    sub.add_argument("--seed", type=int, default=0)
    for sub in kinds.choices.values():
        sub.add_argument("--output", required=True, type=Path, help="items file to write (.jsonl)")
        sub.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    return parser


def convert(args: argparse.Namespace) -> list[Item]:
    if args.kind == "zr2021-lexical":
        return lexical_items(args.dataset, args.split, _table(args))
    if args.kind == "zr2021-syntactic":
        return syntactic_items(args.dataset, args.split, _table(args))
    if args.kind == "spoken-storycloze":
        table = _table(args) if args.units else None
        if args.layout == "pairs":
            if table is None:
                raise BenchmarkError("layout=pairs needs --units (the units of the story wav files)")
            return spoken_pairs(args.root, table)
        return spoken_triplets(args.root, table, args.prefix, args.continuation)
    if args.kind == "salmon":
        return salmon_items(args.root, args.units, args.tasks)
    if args.kind == "storycloze-text":
        return text_items(args.source, args.split, args.config, args.revision)
    if args.kind == "blimp":
        return blimp_items(args.source, args.category, args.revision)
    return synthetic_items(args.corpus, args.split, args.n_items, args.seed)


def main(argv: list[str] | None = None) -> int:
    setup_cli_logging()
    args = build_parser().parse_args(argv)
    if args.output.suffix != ".jsonl":
        return report_error(BenchmarkError(f"--output {args.output}: expected a .jsonl file"))
    try:
        items = convert(args)
        n = write_items(args.output, items, overwrite=args.overwrite)
    except (BenchmarkError, FileExistsError) as err:
        return report_error(err)
    categories = Counter(i.category for i in items if i.category is not None)
    shown = ", ".join(f"{c} {k}" for c, k in sorted(categories.items())[:12]) + (
        ", ..." if len(categories) > 12 else ""
    )
    print(f"{args.kind}: wrote {n} items to {args.output}" + (f" ({shown})" if categories else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
