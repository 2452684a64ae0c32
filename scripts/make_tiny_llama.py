#!/usr/bin/env python
"""Write a small Llama-3.2-shaped HF model directory with random weights (nothing is downloaded).

It has every file a hub snapshot of meta-llama/Llama-3.2-1B has (config.json with llama3 rope scaling,
generation_config.json, safetensors, tokenizer.json / tokenizer_config.json / special_tokens_map.json,
original/tokenizer.model, original/params.json), with torchtune's 2,000-rank tiktoken test vocabulary.
Use it to try the whole pipeline on a laptop (`make demo` does), or to smoke-test an installation.

    python scripts/make_tiny_llama.py --output_dir models/tiny-llama [--hidden_size 128 --num_layers 2]
    python scripts/make_tiny_llama.py --output_dir models/random-1b --shape llama3.2-1b --dtype bfloat16

`--shape llama3.2-1b` writes the real Llama 3.2 1B shapes (16 layers, hidden 2048, 128,000 synthetic BPE
ranks + 256 specials; 2.5 GB in bf16) for throughput benchmarks and GPU smoke tests.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ssi import report_error
from ssi.files import atomic_output_dir
from ssi.testing import LLAMA_3_2_1B, LlamaShape, write_llama_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument("--hidden_size", type=int, default=128)
    parser.add_argument("--num_layers", type=int, default=2)
    parser.add_argument("--num_heads", type=int, default=4, help="head_dim = hidden_size / num_heads must be >= 32")
    parser.add_argument("--num_kv_heads", type=int, default=2)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument(
        "--shape",
        choices=("custom", "llama3.2-1b"),
        default="custom",
        help="llama3.2-1b: the real 1B shapes and a 128,000-rank BPE vocabulary (ignores the size options)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    args = parser.parse_args(argv)
    one_b = args.shape == "llama3.2-1b"
    shape = LLAMA_3_2_1B if one_b else LlamaShape(args.hidden_size, args.num_layers, args.num_heads, args.num_kv_heads)
    if shape.head_dim < 32 or shape.hidden_size % shape.num_heads or shape.num_heads % shape.num_kv_heads:
        print(
            f"error: need hidden_size/num_heads >= 32 (vLLM's CPU backend) and heads divisible by kv heads, "
            f"got hidden {args.hidden_size}, {args.num_heads} heads, {args.num_kv_heads} kv heads",
            file=sys.stderr,
        )
        return 2
    try:
        with atomic_output_dir(args.output_dir, overwrite=args.overwrite) as tmp:
            write_llama_dir(
                tmp, shape=shape, dtype=getattr(torch, args.dtype), seed=args.seed, n_bpe=128000 if one_b else None
            )
    except FileExistsError as err:
        return report_error(err)
    print(args.output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
