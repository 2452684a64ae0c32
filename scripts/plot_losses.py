#!/usr/bin/env python
"""Plot train and dev loss of one or more runs (e.g. CPT then SFT) into one PNG.

    python scripts/plot_losses.py runs/cpt-1b runs/sft-1b --output losses.png

Reads each run's torchtune disk logs (`<run>/logs/log_*.txt`); resumed runs are merged.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from ssi import report_error
from ssi.run_dir import read_metrics, series


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (a recipe's output_dir)")
    parser.add_argument("--output", type=Path, default=Path("losses.png"), help="PNG to write (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing PNG")
    args = parser.parse_args(argv)
    if args.output.exists() and not args.overwrite:
        print(f"error: {args.output} exists; pass --overwrite to replace it", file=sys.stderr)
        return 2
    fig, axes = plt.subplots(1, len(args.runs), figsize=(5 * len(args.runs), 3.8), squeeze=False)
    for ax, run_dir in zip(axes[0], args.runs, strict=True):
        try:
            metrics = read_metrics(run_dir)
        except FileNotFoundError as err:
            return report_error(err)
        for key, style in (("loss", "-"), ("dev_loss", "o-")):
            steps, values = series(metrics, key)
            if steps:
                ax.plot(steps, values, style, label=key.replace("_", " "), markersize=3)
        ax.set_title(run_dir.name)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("cross-entropy (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    tmp = args.output.with_name(f".{args.output.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    tmp.rename(args.output)
    print(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
