#!/usr/bin/env python
"""Bytes read from disk and set-up time of the audio durations (ssi.data.durations), first and second start.

    python bench/bench_durations.py [--n 500] [--seconds 4] [--scale 8]

A parquet corpus of N (then scale x N) utterances with embedded FLAC bytes (as hub LibriSpeech/MLS rows are),
loaded as training does (`load_audio_source`: datasets converts the parquet file into its Arrow cache once, before
any measurement). Each start is a fresh process whose files' pages are evicted from the page cache first
(posix_fadvise DONTNEED on the corpus, the Arrow cache and the manifest); it reports /proc/self/io read_bytes,
the wall time of loading the source and reading every duration, and peak RSS (VmHWM: mapped
Arrow pages that were read count in it). Starts, side by side:
- `every row`: what the recipe did before the manifest: every row's whole audio pulled into Python to read its
  header (`AudioSource.rows` + soundfile.info), at every start;
- `first`: the first start with an empty manifest folder (headers read through zero-copy views, manifest written);
- `second`: the next start (resume, requeue, another rank, generation): the manifest.
`by the durations` is what the durations read after the source is loaded; the rest of a second start's bytes are
`datasets` opening its Arrow file: each record batch's metadata it reads pages in one read-ahead window of audio
around it (`read_ahead_kb`, 128 kB by default, 8 MB on the machine of docs/features.md).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RATE = 16000


def write_corpus(folder: Path, n: int, seconds: float) -> int:
    """n utterances of noise (FLAC does not shrink it: bytes like speech's), lengths spread around `seconds`."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import soundfile

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    ids, audio, total = [], [], 0
    for i in range(n):
        samples = int(RATE * seconds * rng.uniform(0.5, 1.5))
        out = io.BytesIO()
        soundfile.write(out, (rng.standard_normal(samples) * 0.1).astype(np.float32), RATE, format="FLAC")
        data = out.getvalue()
        ids.append(f"utt{i:07d}")
        audio.append({"bytes": data, "path": f"utt{i:07d}.flac"})
        total += len(data)
    table = pa.table({"ID": ids, "transcript": ["a few words"] * n, "audio": audio})
    pq.write_table(table, folder / "train.parquet", row_group_size=100)  # as `datasets` writes audio parquet
    return total


def evict(*folders: Path) -> None:
    for folder in folders:
        for path in folder.rglob("*") if folder.exists() else []:
            if path.is_file():
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)


def read_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    raise RuntimeError("no read_bytes in /proc/self/io")


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: ru_maxrss would carry the parent's across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def start(mode: str, corpus: Path, cache: Path) -> dict:
    """One start in this process (run as a child): load the source, read every duration."""
    import soundfile

    from ssi.data.durations import read_durations
    from ssi.encode.sources import AudioColumns, AudioSourceSpec, load_audio_source

    before, began = read_bytes(), time.perf_counter()
    source = load_audio_source(AudioSourceSpec(str(corpus), "train"), AudioColumns(text="transcript", id="ID"))
    rows, loaded = list(range(len(source))), read_bytes()
    if mode == "every row":
        seconds = []
        for at in range(0, len(rows), 256):
            for row in source.rows(rows[at : at + 256]):
                info = soundfile.info(io.BytesIO(row.audio.data))
                seconds.append(info.frames / info.samplerate)
    else:
        seconds = read_durations(source, rows, cache)
    return {
        "seconds": time.perf_counter() - began,
        "read_bytes": read_bytes() - before,
        "durations_bytes": read_bytes() - loaded,
        "rss_mb": peak_rss_mb(),
        "hours": sum(seconds) / 3600,
    }


def child(mode: str, corpus: Path, cache: Path, hf_cache: Path) -> dict:
    evict(corpus, cache, hf_cache)
    env = {**os.environ, "HF_DATASETS_CACHE": str(hf_cache), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, __file__, "--child", mode, str(corpus), str(cache)], env=env, capture_output=True, text=True
    )
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--scale", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=4.0, help="mean utterance length")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(start(args.child[0], Path(args.child[1]), Path(args.child[2]))))
        return
    results: dict[int, dict[str, dict]] = {}
    ahead = {p.parent.parent.name: p.read_text().strip() for p in Path("/sys/block").glob("*/queue/read_ahead_kb")}
    print(f"read_ahead_kb: {ahead} (the kernel reads this much around each page fault of a memory map)")
    with tempfile.TemporaryDirectory(dir=Path.home() / ".cache") as tmp:  # on disk: tmpfs reads count nothing
        for n in (args.n, args.n * args.scale):
            root = Path(tmp) / str(n)
            audio_bytes = write_corpus(root / "corpus", n, args.seconds)
            hf_cache, cache = root / "hf", root / "durations"
            child("every row", root / "corpus", root / "unused", hf_cache)  # datasets' one-off parquet -> Arrow
            runs = {mode: child(mode, root / "corpus", cache, hf_cache) for mode in ("every row", "first", "second")}
            results[n] = runs
            print(f"\n{n} utterances, {runs['second']['hours']:.2f} h, {audio_bytes / 1e6:.1f} MB of FLAC bytes")
            print(
                "| start | read from disk (MB) | of the audio bytes | by durations (MB) | set-up (s) | peak RSS (MB) |"
            )
            print("|---|---:|---:|---:|---:|---:|")
            for mode, r in runs.items():
                print(
                    f"| {mode} | {r['read_bytes'] / 1e6:.2f} | {r['read_bytes'] / audio_bytes:.1%} | "
                    f"{r['durations_bytes'] / 1e6:.3f} | {r['seconds']:.2f} | {r['rss_mb']:.0f} |"
                )
            manifest = sum(p.stat().st_size for p in cache.glob("*.parquet"))
            print(f"manifest: {manifest / 1e3:.1f} kB ({manifest / n:.1f} B per utterance)")
    small, large = (results[n] for n in (args.n, args.n * args.scale))
    print(f"\nratios ({args.scale}x the utterances):")
    for mode in ("every row", "first", "second"):
        print(
            f"- {mode}: bytes read x{large[mode]['read_bytes'] / max(small[mode]['read_bytes'], 1):.1f}, "
            f"set-up time x{large[mode]['seconds'] / small[mode]['seconds']:.1f}"
        )
    for n, runs in results.items():
        print(
            f"- {n} utterances, second start against every row: bytes read "
            f"{runs['second']['read_bytes'] / max(runs['every row']['read_bytes'], 1):.2%}, set-up time "
            f"{runs['second']['seconds'] / runs['every row']['seconds']:.2f}x"
        )


if __name__ == "__main__":
    main()
