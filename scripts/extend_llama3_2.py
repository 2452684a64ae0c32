#!/usr/bin/env python
"""Extend a Llama 3.x HF checkpoint with discrete speech units.

    python scripts/extend_llama3_2.py --n_new_dsus 5000 --input_dir Llama-3.2-1B

See `python scripts/extend_llama3_2.py --help` and README.md; the logic lives in `ssi.vocab.extend`.
"""

import sys

from ssi.vocab.extend import main

if __name__ == "__main__":
    sys.exit(main())
