"""`scripts/report.py`: read runs, build the report, write `report.csv`, `report.md` and the plots into one
output folder, atomically (docs/experiments.md, "The report")."""

from __future__ import annotations

import argparse
import csv
import io
import logging
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

from ssi import report_error, setup_cli_logging
from ssi.files import atomic_output_dir
from ssi.report import ReportInputError
from ssi.report.markdown import render
from ssi.report.runs import RunResults, expand, headline_metrics, read_run
from ssi.report.table import DEV_WER, build_report, csv_rows

READ_THREADS = 8  # small files, often on a network file system: reads overlap their latency


def run_paths(given: list[Path]) -> list[Path]:
    """The run directories the arguments name (a sweep folder stands for its runs), each once."""
    seen: dict[Path, Path] = {}
    for path in given:
        for run in expand(path):
            seen.setdefault(run.resolve(), run)
    return list(seen.values())


def check_output(output: Path, runs: list[Path]) -> None:
    target = output.resolve()
    for run in runs:
        if target == run.resolve() or run.resolve() in target.parents:
            raise ReportInputError(
                f"--output {output} is inside the run directory {run}: reports never write into runs"
            )


def read_runs(paths: list[Path], progress: bool = True) -> list[RunResults]:
    with ThreadPoolExecutor(max_workers=min(READ_THREADS, len(paths))) as pool:
        reading = pool.map(read_run, paths)
        return list(tqdm(reading, total=len(paths), desc="reading runs", unit="run", disable=not progress or None))


def write_report(
    runs: list[RunResults],
    output: Path,
    *,
    sources: list[str],
    select_by: str | None = None,
    plots: bool = True,
    max_step_columns: int = 12,
    overwrite: bool = False,
) -> Path:
    """Write the report of `runs` into `output` (a new folder, or replaced with `overwrite`); returns report.md."""
    report = build_report(runs, select_by)
    with atomic_output_dir(output, overwrite=overwrite) as tmp:
        text = io.StringIO()
        csv.writer(text, lineterminator="\n").writerows(csv_rows(report))
        (tmp / "report.csv").write_text(text.getvalue())
        if plots:
            from ssi.report.plots import write_plots  # matplotlib only when plotting

            drawn = write_plots(report, headline_metrics(report.metrics), tmp)
        else:
            drawn = {}
        (tmp / "report.md").write_text(render(report, sources, drawn, select_by, max_step_columns))
    return output / "report.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/report.py",
        description="One table and a few plots across training runs: a row per run and checkpoint step with losses, "
        "WER per test set and split, benchmark accuracies and the settings that differ between the runs.",
    )
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (a sweep's folder stands for its runs)")
    parser.add_argument("--output", type=Path, default=Path("report"), help="folder to write (default: %(default)s)")
    parser.add_argument(
        "--select-by",
        default=None,
        help=f"metric that picks each run's best checkpoint: {DEV_WER} (WER of the run's dev split), dev_loss, "
        "train_loss, wer/<dataset>/<split>, acc/<benchmark>; default: dev WER where the run has one, else dev loss",
    )
    parser.add_argument("--max-step-columns", type=int, default=12, help="more steps: best/last columns only")
    parser.add_argument("--no-plots", action="store_true", help="write report.csv and report.md only")
    parser.add_argument(
        "--skip-unreadable", action="store_true", help="leave out unreadable files (listed in report.md)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output folder")
    args = parser.parse_args(argv)
    setup_cli_logging(logging.WARNING)
    started = time.perf_counter()
    try:
        paths = run_paths(args.runs)
        check_output(args.output, paths)
        runs = read_runs(paths)
        problems = [problem for run in runs for problem in run.problems]
        if problems and not args.skip_unreadable:
            for problem in problems:
                print(f"error: {problem}", file=sys.stderr)
            return report_error(
                ReportInputError("unreadable files above; pass --skip-unreadable to report without them")
            )
        path = write_report(
            runs,
            args.output,
            sources=[str(p) for p in args.runs],
            select_by=args.select_by,
            plots=not args.no_plots,
            max_step_columns=args.max_step_columns,
            overwrite=args.overwrite,
        )
    except (ReportInputError, FileExistsError) as err:
        return report_error(err)
    rows = sum(len(run.steps) for run in runs)
    print(f"report of {len(runs)} runs, {rows} checkpoint steps in {time.perf_counter() - started:.1f} s: {path}")
    return 0
