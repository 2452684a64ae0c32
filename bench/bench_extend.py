"""Extension cost on a full-size Llama-3.2-1B-shaped checkpoint, against a plain copy of its files.

Generates a random bf16 checkpoint with the real 1B shapes (128,000 BPE ranks + 256 specials,
hidden 2048, 16 layers, tied embeddings: ~2.47 GB), then measures, each in its own process:
  reference  `cp -r` of the checkpoint directory
  ssi        scripts/extend_llama3_2.py --n_new_dsus 5000
and prints wall time and peak RSS as ratios to the copy and to the checkpoint size. Page-cache writeback
makes single timings swing several-fold on small machines, so the two commands alternate, `--repeats`
times each, and the best time of each is compared. The extension's own log gives where its time went
(fitting the new rows, copying, waiting for the fit).
Targets (issue 13): time <= 2x the copy, peak RSS <= 1.5x the checkpoint's weights.

    python bench/bench_extend.py [--workdir /tmp/ssi-bench-extend] [--n_new_dsus 5000] [--keep]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SETTLE_S = 3.0


def run_measured(cmd: list[str], output: Path, log: Path) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one child process, read from its own rusage; stderr goes to `log`.
    Both commands start alike: their previous `output` deleted, the disk flushed and given a moment to settle
    (deleting gigabytes on a `discard` mount keeps the disk busy after `rm` returns)."""
    shutil.rmtree(output, ignore_errors=True)
    subprocess.run(["sync"], check=True)
    time.sleep(SETTLE_S)
    start = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"command failed: {' '.join(cmd)}\n{log.read_text()[-2000:]}")
    return elapsed, usage.ru_maxrss * 1024


def phases(log: Path) -> str:
    """The extension's own account of its time, from its log lines."""
    text = log.read_text()
    fit = re.search(r"fitted \S+ init for \d+ new rows in ([\d.]+)s", text)
    copy = re.search(r"wrote [\d.]+ GB of weights in ([\d.]+)s \(([\d.]+) GB/s\), ([\d.]+)s of it waiting", text)
    total = re.search(r"wrote \S+ \(vocab \d+ -> \d+\) in ([\d.]+)s", text)
    if not (fit and copy and total):
        return "phase timings not found in the extension's log"
    return (
        f"fit {fit.group(1)} s (in a thread, beside the copy); weights {copy.group(1)} s at {copy.group(2)} GB/s, "
        f"{copy.group(3)} s of it waiting for the fit; output directory {total.group(1)} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/ssi-bench-extend"))
    parser.add_argument("--n_new_dsus", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs of each command (best counts)")
    parser.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    args = parser.parse_args()

    shutil.rmtree(args.workdir, ignore_errors=True)
    base = args.workdir / "Llama-3.2-1B-random"
    t0 = time.perf_counter()
    # Generated in a child: this process stays small, so the measured children (forked from it)
    # do not start with its memory already counted in their peak RSS.
    generate = (
        "import sys, torch; from ssi.testing import LLAMA_3_2_1B, write_llama_dir; "
        "write_llama_dir(sys.argv[1], shape=LLAMA_3_2_1B, dtype=torch.bfloat16, n_bpe=128000)"
    )
    subprocess.run([sys.executable, "-c", generate, str(base)], check=True)
    size = sum(p.stat().st_size for p in base.rglob("*") if p.is_file())
    weights = (base / "model.safetensors").stat().st_size
    elapsed = time.perf_counter() - t0
    print(f"generated {base} ({weights / 1e9:.2f} GB weights, {size / 1e9:.2f} GB total) in {elapsed:.0f}s")

    copy_dir, ext_dir = args.workdir / "plain-copy", args.workdir / "extended"
    ext_cmd = [
        sys.executable,
        str(REPO / "scripts/extend_llama3_2.py"),
        "--n_new_dsus",
        str(args.n_new_dsus),
        "--input_dir",
        str(base),
        "--output_dir",
        str(ext_dir),
        "--no-progress",
    ]
    copies, extensions = [], []
    logs = [args.workdir / f"extend-{k}.log" for k in range(args.repeats)]
    for log in logs:
        copies.append(run_measured(["cp", "-r", str(base), str(copy_dir)], copy_dir, args.workdir / "cp.log"))
        extensions.append(run_measured(ext_cmd, ext_dir, log))
    copy_s, copy_rss = min(copies)
    ext_s, ext_rss = min(t for t, _ in extensions), max(r for _, r in extensions)
    best = logs[min(range(args.repeats), key=lambda k: extensions[k][0])]
    time_ratio, rss_ratio = ext_s / copy_s, ext_rss / weights
    print(f"best of {args.repeats} alternating runs (peak RSS: the largest seen)")
    print(f"{'':<10}{'wall s':>10}{'peak RSS GB':>14}")
    print(f"{'cp -r':<10}{copy_s:>10.1f}{copy_rss / 1e9:>14.2f}")
    print(f"{'extend':<10}{ext_s:>10.1f}{ext_rss / 1e9:>14.2f}")
    print(f"time / copy           = {time_ratio:.2f}x  (target <= 2.0x) {'OK' if time_ratio <= 2 else 'MISSED'}")
    print(f"peak RSS / checkpoint = {rss_ratio:.2f}x  (target <= 1.5x) {'OK' if rss_ratio <= 1.5 else 'MISSED'}")
    runs = " / ".join(f"{c:.1f} vs {e:.1f}" for (c, _), (e, _) in zip(copies, extensions, strict=True))
    print(f"every run, cp vs extend (s): {runs}")
    print(f"best extension: {phases(best)}")
    if not args.keep:
        shutil.rmtree(args.workdir)


if __name__ == "__main__":
    main()
