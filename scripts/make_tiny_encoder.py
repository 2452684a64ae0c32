#!/usr/bin/env python
"""Write a tiny random-weight speech encoder directory (nothing is downloaded), for a dry run of the audio ->
units path on a machine without the hub: the same geometry as the real model (HuBERT: 16 kHz, 320 samples per
frame = 50 Hz; Mimi: 24 kHz, 1920 samples = 12.5 Hz), so frame counts and every file it writes are realistic.

    python scripts/make_tiny_encoder.py --output models/tiny-hubert                 # HuBERT, 4 layers
    python scripts/make_tiny_encoder.py --output models/tiny-mimi --kind mimi
    python scripts/train_kmeans.py source=data/my_corpus split=train encoder.model=models/tiny-hubert \
        encoder.layer=2 n_units=100 output=models/tiny-hubert-km100.npy

The units it gives are meaningless: use it to check a corpus, the commands and the outputs, then encode with a
real model (docs/encoding.md, "Models without the hub").
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ssi import report_error
from ssi.encode.fixtures import write_tiny_hubert, write_tiny_mimi
from ssi.files import atomic_output_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, required=True, help="the model directory to write")
    parser.add_argument("--kind", choices=("hubert", "mimi"), default="hubert")
    parser.add_argument("--layers", type=int, default=4, help="HuBERT transformer layers (encoder.layer < this)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    args = parser.parse_args(argv)
    try:
        with atomic_output_dir(args.output, overwrite=args.overwrite) as tmp:
            if args.kind == "hubert":
                write_tiny_hubert(tmp, layers=args.layers, seed=args.seed)
            else:
                write_tiny_mimi(tmp, seed=args.seed)
    except FileExistsError as err:
        return report_error(err)
    print(f"wrote a tiny random {args.kind} encoder to {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
