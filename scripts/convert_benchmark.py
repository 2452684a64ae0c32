#!/usr/bin/env python
"""Convert a published likelihood benchmark into the items format of scripts/evaluate.py.

    python scripts/convert_benchmark.py zr2021-lexical --dataset zr2021 --units enc/lexical --output swuggy.jsonl
    python scripts/convert_benchmark.py zr2021-syntactic --dataset zr2021 --units enc/syntactic --output sblimp.jsonl
    python scripts/convert_benchmark.py spoken-storycloze --root sSC --layout pairs --units enc/ssc --output ssc.jsonl
    python scripts/convert_benchmark.py salmon --root salmon_benchmark --units 'enc/salmon_{task}' --output salmon.jsonl
    python scripts/convert_benchmark.py storycloze-text --source cloze_test_test__spring2016.csv --output sc_text.jsonl
    python scripts/convert_benchmark.py blimp --output blimp.jsonl
    python scripts/convert_benchmark.py synthetic --corpus data/synthetic --output synthetic_test.jsonl

Each kind and its pairing rule are described in docs/evaluation.md ("Converters"); the work is ssi.eval.converters.
"""

import sys

from ssi.eval.converters.cli import main

if __name__ == "__main__":
    sys.exit(main())
