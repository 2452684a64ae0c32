#!/usr/bin/env python
"""Sample preparation throughput of the data pipeline on MLS-like utterances, on one core.

    python bench/bench_data.py [--n 2000] [--seconds 15] [--max_seq_len 2048] [--no-profile]

Utterances are ~15 s at 50 Hz (~750 HuBERT-like units out of 5000) with ~2.6 words/s drawn from a
few thousand English-like words, encoded for a tiny Llama-3.2-shaped model extended with 5000 DSUs
(the DSU path never touches BPE, so the small 2,000-rank test vocabulary does not flatter it; it
makes text tokens longer than the real 128k vocabulary would, which is the conservative side).

Measured side by side in this run:
- interleaved CPT sequences (`CPTDataset`) vs the naive reference that writes the same spans as a
  string (DSU characters + words) and encodes it through the tokenizer's string path;
- SFT examples (`SFTDataset`, torchtune's tokenize_messages);
- useful-token ratio of padded batches vs bounded-buffer packing on the same lengths;
- a cProfile of the CPT path (what dominates).
Target: >= 100k prepared tokens/s per core for interleaved CPT.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import itertools
import pstats
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import datasets
import numpy as np
import torch

from ssi.data.collate import collate_padded
from ssi.data.cpt import CPTDataset, CPTOptions, sample_rng, speech_span
from ssi.data.packing import PackedDataset
from ssi.data.sft import SFTDataset, SFTOptions
from ssi.data.sources import ColumnNames, validate_dataset
from ssi.testing import write_llama_dir
from ssi.vocab.extend import extend_model_dir
from ssi.vocab.layout import MODALITY_SPEECH, MODALITY_TEXT, dsus_to_text
from ssi.vocab.tiktoken import SpeechLlama3Tokenizer, load_tokenizer

N_UNITS, FPS = 5000, 50.0
SYLLABLES = "ba be bi bo bu da de di do du ka ke ki ko ku la le li lo lu ma me mi mo mu na ne ni no nu ra re ri ro ru"


def mls_like_rows(n: int, seconds: float, seed: int) -> list[dict]:
    """Utterances with HuBERT-like runs (units held 1-4 frames) and word alignments at 50 Hz."""
    rng = random.Random(seed)
    syllables = SYLLABLES.split()
    lexicon = ["".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(4000)]
    rows = []
    for i in range(n):
        duration = min(max(rng.gauss(seconds, seconds / 5), 2.0), 2 * seconds)
        n_frames = int(duration * FPS)
        units: list[int] = []
        while len(units) < n_frames:
            units += [rng.randrange(N_UNITS)] * rng.randint(1, 4)
        units = units[:n_frames]
        n_words = max(1, int(duration * 2.6))
        edges = sorted(rng.uniform(0.1, duration - 0.1) for _ in range(2 * n_words))
        words = [rng.choice(lexicon) for _ in range(n_words)]
        rows.append(
            {
                "ID": f"bench_{i:06d}",
                "transcript": " ".join(words),
                "tokenized": words,
                "aligned_token_start_time": [round(t, 2) for t in edges[0::2]],
                "aligned_token_end_time": [round(t, 2) for t in edges[1::2]],
                "speech_tokens": units,
            }
        )
    return rows


def naive_interleaved(dataset: CPTDataset, tokenizer: SpeechLlama3Tokenizer, index: int) -> list[int]:
    """Reference: the same spans and modality choices, written as text and encoded through the string path."""
    row = dataset.ds[index]
    rng = sample_rng(dataset.options.seed, dataset.epoch, index)
    words, starts, ends = row["tokenized"], row["aligned_token_start_time"], row["aligned_token_end_time"]
    speech = row["speech_tokens"]
    cuts = dataset.options.span.boundaries(rng, len(words))
    is_speech = bool(rng.integers(2))
    text = ""
    for a, b in itertools.pairwise(cuts):
        if is_speech:
            lo, hi = speech_span(np.asarray(starts), np.asarray(ends), a, b, FPS, len(speech))
            text += MODALITY_SPEECH + dsus_to_text(speech[lo:hi])
        else:
            text += MODALITY_TEXT + " ".join(words[a:b])
        is_speech = not is_speech
    return tokenizer.encode(text, add_bos=True, add_eos=True)


def throughput(build: Callable[[int], list[int]], n: int) -> tuple[float, float, float]:
    """(samples/s, tokens/s, mean tokens) of building samples 0..n-1 in this process."""
    start = time.perf_counter()
    total = sum(len(build(i)) for i in range(n))
    elapsed = time.perf_counter() - start
    return n / elapsed, total / elapsed, total / n


def useful_ratios(lengths: list[int], max_seq_len: int, batch_size: int, seed: int) -> tuple[float, float]:
    """Non-padding share of padded batches (random order) and of bounded-buffer packs."""
    order = np.random.default_rng(seed).permutation(len(lengths))
    padded = 0
    for i in range(0, len(order), batch_size):
        batch = [lengths[j] for j in order[i : i + batch_size]]
        padded += max(batch) * len(batch)

    class Lengths(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(lengths)

        def __getitem__(self, index: int) -> dict:
            return {"tokens": [1] * lengths[index], "labels": [1] * lengths[index]}

    packs = list(PackedDataset(Lengths(), max_seq_len, pad_id=0, seed=seed))
    return sum(lengths) / padded, sum(lengths) / (len(packs) * max_seq_len)


def profile_top(build: Callable[[int], list[int]], n: int, top: int = 12) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    for i in range(n):
        build(i)
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(top)
    lines = [line for line in out.getvalue().splitlines() if line.strip()]
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith("ncalls"))
    return "\n".join(lines[start : start + top + 1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=2000, help="utterances per measurement")
    parser.add_argument("--seconds", type=float, default=15.0, help="mean utterance length")
    parser.add_argument("--max_seq_len", type=int, default=2048)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-profile", dest="profile", action="store_false")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        base = write_llama_dir(Path(tmp) / "base", dtype=torch.float32)
        model = extend_model_dir(base, Path(tmp) / "extended", N_UNITS, progress=False)
        tokenizer = load_tokenizer(model)
    rows = mls_like_rows(args.n, args.seconds, args.seed)
    ds = datasets.Dataset.from_list(rows)
    frames = sum(len(r["speech_tokens"]) for r in rows)
    words = sum(len(r["tokenized"]) for r in rows)
    print(f"{args.n} utterances, mean {frames / args.n / FPS:.1f} s = {frames / args.n:.0f} frames, ")
    print(f"{words / args.n:.1f} words; {N_UNITS} DSUs; one process, torch threads = 1\n")

    options = CPTOptions(sequence_type="interleaved", max_seq_len=None)
    cpt = CPTDataset(ds, tokenizer, FPS, options)
    for i in range(min(50, args.n)):  # the two paths must agree before they are timed
        assert cpt.build(i).tokens == naive_interleaved(cpt, tokenizer, i), f"paths differ on sample {i}"
    cpt_rate = throughput(lambda i: cpt.build(i).tokens, args.n)
    naive_rate = throughput(lambda i: naive_interleaved(cpt, tokenizer, i), args.n)
    cpt_dedup = CPTDataset(ds, tokenizer, FPS, CPTOptions(dedup=True, max_seq_len=None))
    dedup_rate = throughput(lambda i: cpt_dedup.build(i).tokens, args.n)
    sft = SFTDataset(ds, tokenizer, SFTOptions(max_seq_len=None, system_prompt="Transcribe the speech."))
    sft_rate = throughput(lambda i: sft[i]["tokens"], args.n)

    print(f"{'path':44s} {'samples/s':>10s} {'tokens/s':>12s} {'tokens/sample':>14s}")
    for name, (sps, tps, mean) in (
        ("CPT interleaved (direct DSU ids)", cpt_rate),
        ("  reference: string path through encode()", naive_rate),
        ("CPT interleaved + dedup", dedup_rate),
        ("SFT (torchtune tokenize_messages)", sft_rate),
    ):
        print(f"{name:44s} {sps:10.0f} {tps:12.0f} {mean:14.0f}")
    print(f"\nCPT interleaved vs string-path reference: {cpt_rate[1] / naive_rate[1]:.2f}x tokens/s")
    target = 100_000
    verdict = "meets" if cpt_rate[1] >= target else "MISSES"
    print(f"target >= {target} prepared tokens/s per core for interleaved CPT: {verdict} ({cpt_rate[1]:.0f})")

    cpt_lengths = [len(cpt.build(i).tokens) for i in range(args.n)]
    sft_lengths = [len(sft[i]["tokens"]) for i in range(args.n)]
    limit = max(args.max_seq_len, max(cpt_lengths), max(sft_lengths))
    print(f"\nuseful-token ratio (non-padding / all positions), batch {args.batch_size}, pack length {limit}:")
    for name, lengths in (("CPT interleaved", cpt_lengths), ("SFT", sft_lengths)):
        padded, packed = useful_ratios(lengths, limit, args.batch_size, args.seed)
        print(f"  {name:16s} padded {padded:6.1%}   packed {packed:6.1%}   ({packed / padded:.2f}x)")
    batch = collate_padded([cpt[i] for i in range(args.batch_size)], tokenizer.pad_id, tokenizer.vocab)
    counts = {k: int(v) for k, v in batch["token_counts"].items()}
    print(f"  one padded CPT batch: {counts}")

    start = time.perf_counter()
    validate_dataset(ds, ColumnNames(), N_UNITS, FPS)
    rows_per_s = args.n / (time.perf_counter() - start)
    print(f"\nvalidation (vectorised over Arrow batches): {rows_per_s:.0f} rows/s", end="")
    print(f" = {10_808_037 / rows_per_s / 60:.1f} min for the 10.8M MLS English train utterances")
    row_rate = throughput(lambda i: ds[i]["speech_tokens"], args.n)
    share = cpt_rate[0] / row_rate[0]
    print(f"reading rows alone (datasets row access): {row_rate[0]:.0f} samples/s = {share:.0%} of the CPT time")
    if args.profile:
        print(f"\ncProfile of {min(500, args.n)} interleaved CPT samples (sorted by own time):")
        print(profile_top(lambda i: cpt.build(i).tokens, min(500, args.n)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
