#!/usr/bin/env python
"""Encoding pipeline throughput as a ratio to the bare encoder forward on the same batches.

    python bench/bench_encode.py [--n 24] [--rounds 3] [--device cpu] [--hidden 384] [--layers 4]

A randomly initialised HuBERT with the real convolutional front end (7 layers of 512 channels, 320 samples
per frame) and a small transformer, layer `--layers` + 500 random centroids, over an audiofolder of
synthetic clips (1-6 s; half 16 kHz mono wav, half 44.1 kHz stereo flac that must be mixed and resampled).
Measured side by side, alternating, best of `--rounds`:
- bare: the encoder forward alone (`model(input_values, attention_mask)`) on the batches the pipeline
  forms, with the audio already decoded and prepared by the feature extractor;
- pipeline: everything scripts/encode_audio.py does once the model is loaded: open the source, read and
  decode (threads), resample, mix to mono, batch, feature extraction, forward, nearest centroid, parquet
  shard, manifest. Rows go in chunks of 8, so this small set is read as a corpus is: each chunk is decoded
  while the previous one is encoded.
Goal: pipeline >= 0.8x the bare forward's throughput (audio seconds per wall second).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ssi.encode.audio import decode_audio
from ssi.encode.batching import plan_batches
from ssi.encode.encoders import KMeansEncoder, build_encoder
from ssi.encode.fixtures import Clip, write_audiofolder, write_hubert_like
from ssi.encode.output import EncodedOutput, output_schema
from ssi.encode.pipeline import encode_rows
from ssi.encode.settings import BatchSettings, RunSettings
from ssi.encode.sources import AudioColumns, AudioSourceSpec, load_audio_source

K = 500


def clips(n: int) -> list[Clip]:
    rng = np.random.default_rng(0)
    return [
        Clip(f"b{i:04d}", float(rng.uniform(1.0, 6.0)), *((16000, 1, "wav") if i % 2 else (44100, 2, "flac")))
        for i in range(n)
    ]


def bare_forward(encoder: KMeansEncoder, inputs: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    model = encoder.features.model
    start = time.perf_counter()
    with torch.inference_mode():
        for values, mask in inputs:
            model(values, attention_mask=mask)
    return time.perf_counter() - start


def pipeline(encoder: KMeansEncoder, folder: Path, out: Path, settings: RunSettings) -> float:
    start = time.perf_counter()
    source = load_audio_source(AudioSourceSpec(str(folder), "train"), AudioColumns())
    output = EncodedOutput(out)
    with output.write_shard(output.shard_path("train", 0, 1), output_schema(False)) as writer:
        stats, _ = encode_rows(source, range(len(source)), encoder, settings, writer, "bench")
        writer.set_footer({"encoder": encoder.identity(), "settings": {}, **stats.footer(), "skipped": 0,
                           "skipped_rows": [], "versions": {}})  # fmt: skip
    output.update_manifest()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=24, help="clips")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch_seconds", type=float, default=30.0)
    parser.add_argument("--num_workers", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    device = torch.device(args.device)
    root = Path(tempfile.mkdtemp(prefix="bench_encode_"))
    try:
        model = write_hubert_like(root / "hubert", hidden_size=args.hidden, layers=args.layers)
        np.save(root / "km.npy", np.random.default_rng(0).standard_normal((K, args.hidden)).astype(np.float32))
        folder = write_audiofolder(root / "audio", clips(args.n))
        encoder = build_encoder(
            {"name": "bench", "n_units": K, "sampling_rate": 16000, "downsampling_ratio": 320, "backend": "ssl_kmeans",
             "model": str(model), "layer": args.layers, "kmeans": str(root / "km.npy")},
            device, torch.float32,
        )  # fmt: skip
        assert isinstance(encoder, KMeansEncoder)
        settings = RunSettings(BatchSettings(args.batch_seconds, 64, True), chunk_rows=8, num_workers=args.num_workers,
                               progress=False)  # fmt: skip
        # The bare forward gets the pipeline's batches (per chunk of `chunk_rows`, longest first), prepared.
        waves = [decode_audio(ref, 16000) for ref in (r.audio for r in load_audio_source(
            AudioSourceSpec(str(folder), "train"), AudioColumns()).rows(range(args.n)))]  # fmt: skip
        inputs = []
        for lo in range(0, len(waves), settings.chunk_rows):
            chunk = waves[lo : lo + settings.chunk_rows]
            for batch in plan_batches(
                [len(w) for w in chunk], int(args.batch_seconds * 16000), 64, encoder.padding_exact
            ):
                prepared = encoder.features.fe([chunk[i] for i in batch], sampling_rate=16000, padding=True,
                                               return_attention_mask=True, return_tensors="pt")  # fmt: skip
                inputs.append((prepared["input_values"].to(device), prepared["attention_mask"].to(device)))
        audio_seconds = sum(len(w) for w in waves) / 16000
        bare_forward(encoder, inputs[:1])  # warm-up
        bare, full = [], []
        for round_ in range(args.rounds):
            bare.append(bare_forward(encoder, inputs))
            out = root / f"out{round_}"
            full.append(pipeline(encoder, folder, out, settings))
            shutil.rmtree(out)
        best_bare, best_full = min(bare), min(full)
        print(f"audio: {args.n} clips, {audio_seconds:.1f} s; model: HuBERT front end + {args.layers} x {args.hidden}")
        print(f"k={K}; device {device}, torch threads {torch.get_num_threads()}, decode threads {args.num_workers}")
        print(f"bare encoder forward: {best_bare:.2f} s ({audio_seconds / best_bare:.1f}x real time)")
        print(f"whole pipeline:       {best_full:.2f} s ({audio_seconds / best_full:.1f}x real time)")
        ratio = best_bare / best_full
        print(f"pipeline / bare throughput: {ratio:.2f}x (goal >= 0.8x) {'OK' if ratio >= 0.8 else 'BELOW GOAL'}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
