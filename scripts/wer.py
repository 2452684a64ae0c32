#!/usr/bin/env python
"""Word error rate of generated transcripts; writes wer.json beside the generations file.

    python scripts/wer.py runs/sft/generations/epoch_0/global_step_500/mls_hubert/test/generations.jsonl

See `python scripts/wer.py --help` and README.md; the logic lives in `ssi.eval.scoring`.
"""

import sys

from ssi.eval.scoring import main

if __name__ == "__main__":
    sys.exit(main())
