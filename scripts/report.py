#!/usr/bin/env python
"""One table and a few plots across training runs (an experiment matrix, a sweep, or CPT and SFT of one run).

    python scripts/report.py RUN_DIR [RUN_DIR ...] [--output <dir>] [--select-by <metric>]
    python scripts/report.py runs/matrix/cpt runs/matrix/sft --output reports/matrix   # a sweep folder = its runs

Writes report.csv (a row per run and checkpoint step), report.md (a table per metric, the best checkpoint of
each run, what is missing) and PNG plots into --output. Reads small files only and never writes into runs.
See docs/experiments.md; the logic lives in `ssi.report`.
"""

import sys

from ssi.report.cli import main

if __name__ == "__main__":
    sys.exit(main())
