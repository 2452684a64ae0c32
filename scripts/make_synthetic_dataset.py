#!/usr/bin/env python
"""Write the synthetic DSU corpus used by the tests and `make demo`.

    python scripts/make_synthetic_dataset.py --output_dir data/synthetic --n_units 300

See `--help`; the logic lives in `ssi.data.synthetic` (importable: `make_synthetic_dataset`).
"""

import sys

from ssi.data.synthetic import main

if __name__ == "__main__":
    sys.exit(main())
