#!/usr/bin/env python
"""Evaluate every checkpoint of a run: generation + WER on test sets, likelihood benchmarks, here or on Slurm.

    python scripts/evaluate_run.py run=runs/sft-1b [last=N] [test_sets=[test,...]] [benchmarks=[a.jsonl,...]]
        [launcher=local|slurm|print] [generate.<key>=<value> ...] [evaluate.<key>=<value> ...]

The configuration is conf/evaluate_run.yaml (every default documented there), composed with Hydra's compose
API so that `generate.*` / `evaluate.*` arguments can be routed to scripts/generate.py and scripts/evaluate.py;
the work is ssi.generate.every_checkpoint (docs/evaluation.md, "Every checkpoint").
"""

import sys
from pathlib import Path

from ssi.generate.every_checkpoint import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], repo=Path(__file__).resolve().parents[1]))
