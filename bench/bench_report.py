#!/usr/bin/env python
"""Report speed over a large sweep: scripts/report.py's work on R runs x C checkpoints vs reading the same files raw.

    python bench/bench_report.py [--runs 200] [--checkpoints 20] [--plots]

The tree is synthetic (`ssi.report.synthetic`): per run a resolved config, a metric log with a line per step,
and at every checkpoint the files of a complete checkpoint (empty: the report never opens weights), two
scored generation folders (`wer.json`) and a benchmark `summary.json`. Timed side by side, best of 3 each:
- raw: every file the report reads, read as bytes in one walk of the tree (the I/O floor; no parsing);
- report: `read_runs` + `build_report` + report.csv + report.md (what scripts/report.py does, without plots);
- plots (with --plots): the PNGs on their own.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from ssi.report.cli import read_runs, run_paths, write_report
from ssi.report.plots import write_plots
from ssi.report.runs import headline_metrics
from ssi.report.synthetic import run_config, write_sweep
from ssi.report.table import build_report

READ_BY_REPORT = {"torchtune_config.yaml", "ssi.json", "wer.json", "summary.json"}


def read_raw(root: Path) -> int:
    """Bytes of every file the report reads (configs, logs, manifests, scores), read in one walk."""
    total = 0
    for folder, _dirs, files in os.walk(root):
        for name in files:
            if name in READ_BY_REPORT or name.startswith("log_"):
                with open(os.path.join(folder, name), "rb") as f:
                    total += len(f.read())
    return total


def best_of(n: int, fn: Callable[[], object]) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--checkpoints", type=int, default=20)
    parser.add_argument("--plots", action="store_true", help="also time the PNG plots")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "sweep"
        start = time.perf_counter()
        steps = [100 * (i + 1) for i in range(args.checkpoints)]
        cells = [{"seed": i % 10, "optimizer.lr": 1e-4 * (1 + i // 10)} for i in range(args.runs)]
        write_sweep(root, run_config(), cells, steps)
        n_ckpt = args.runs * args.checkpoints
        size_mb, seconds = read_raw(root) / 1e6, time.perf_counter() - start
        print(f"synthetic sweep: {args.runs} runs x {args.checkpoints} checkpoints ({n_ckpt} checkpoint steps, "
              f"{size_mb:.1f} MB of small files) written in {seconds:.1f} s")  # fmt: skip
        paths = run_paths([root])
        out = Path(tmp) / "report"

        def report() -> None:
            runs = read_runs(paths, progress=False)
            write_report(runs, out, sources=[str(root)], plots=False, overwrite=True)

        raw = best_of(3, lambda: read_raw(root))
        full = best_of(3, report)
        print(f"raw read of the same files : {raw:7.2f} s  ({1e3 * raw / n_ckpt:.3f} ms per checkpoint)")
        print(f"report (csv + md)          : {full:7.2f} s  ({1e3 * full / n_ckpt:.3f} ms per checkpoint)")
        print(f"ratio report / raw read    : {full / raw:7.1f}x")
        if args.plots:
            built = build_report(read_runs(paths, progress=False))
            (Path(tmp) / "plots").mkdir()
            plots = best_of(1, lambda: write_plots(built, headline_metrics(built.metrics), Path(tmp) / "plots"))
            print(f"plots                      : {plots:7.2f} s  ({len(list((Path(tmp) / 'plots').iterdir()))} PNGs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
