#!/usr/bin/env python
"""Disk bytes each checkpoint adds to a run: full training vs a frozen LLM (issue 29, item 4).

    python bench/bench_checkpoint.py [--checkpoints 4]

Saves `--checkpoints` checkpoints through `SpeechCheckpointer` for two bf16 Llama shapes (the tests' tiny
one and a wider 4-layer one, both extended with 300 DSUs) and three kinds of training state:
- full: every weight changes between checkpoints;
- projector: the LLM is frozen (trainable=projector, method=features); a 4 MB projector file stands for the
  method's own files;
- new_embeddings: only the embedding and output rows change; `max_shard_size` is set to a quarter of the
  weights, so the checkpoint is sharded and the unchanged tensors get shards of their own.
"New bytes" are the blocks of files whose inode the run did not hold before the save (st_blocks, so hard
links count once), i.e. what `du` of the run grows by. No optimizer state is saved: the figures are the
model directory's. The last lines extrapolate to Llama 3.2 1B and 3.1 8B (bf16) with 40 checkpoints.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from ssi.model.checkpointer import SpeechCheckpointer
from ssi.testing import LlamaShape, write_llama_dir
from ssi.vocab.extend import extend_model_dir

SHAPES = {
    "tiny (dim 64, 2 layers)": LlamaShape(),
    "wide (dim 768, 4 layers)": LlamaShape(hidden_size=768, num_layers=4, num_heads=12, num_kv_heads=4),
}
PROJECTOR_BYTES = 4 << 20
LLM_BYTES = {"Llama-3.2-1B": 2.47e9, "Llama-3.1-8B": 16.06e9}  # bf16 weights of the hub's checkpoints
N_LONG_RUN = 40  # a 20,000-step run with save_steps=500


def disk_bytes(root: Path, seen: set[int]) -> tuple[int, int]:
    """Allocated bytes of the files under `root` whose inode is not in `seen` (which is updated): all of them,
    and those of the LLM's weight files (model*.safetensors)."""
    total = weights = 0
    for dirpath, _, files in os.walk(root):
        for name in files:
            st = os.stat(os.path.join(dirpath, name))
            if st.st_ino not in seen:
                seen.add(st.st_ino)
                total += st.st_blocks * 512
                weights += st.st_blocks * 512 if name.startswith("model") and name.endswith(".safetensors") else 0
    return total, weights


def trained(mode: str, state: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
    """The model state at checkpoint `step` of a run training `mode`."""
    if mode == "projector":
        return state
    if mode == "full":
        return {k: v + 1e-2 * step for k, v in state.items()}
    changed = dict(state)
    for name in ("tok_embeddings.weight", "output.weight"):
        if name in changed:
            changed[name] = changed[name].clone()
            changed[name][-300:] += 1e-2 * step
    return changed


def projector_writer(mode: str) -> Callable[[Path], None] | None:
    if mode != "projector":
        return None

    def write(folder: Path) -> None:
        save_file({"weight": torch.randn(PROJECTOR_BYTES // 4)}, str(folder / "speech_projector.safetensors"))

    return write


def bench(model_dir: Path, work: Path, mode: str, n: int) -> tuple[int, list[tuple[int, int]]]:
    """(bytes of the LLM's weights, new bytes of each checkpoint: all, the LLM weights')."""
    weights = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    shard = f"{weights // 4}B" if mode == "new_embeddings" else "5GB"
    run = work / f"run-{mode}"
    checkpointer = SpeechCheckpointer(model_dir, run, max_shard_size=shard, progress=False)
    state = checkpointer.load_checkpoint()["model"]
    seen: set[int] = set()
    added = []
    for step in range(1, n + 1):
        checkpointer.save_checkpoint(
            {"model": trained(mode, state, step)}, 0, step=step, files_writer=projector_writer(mode)
        )
        added.append(disk_bytes(run, seen))
    return weights, added


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for label, shape in SHAPES.items():
            base = write_llama_dir(Path(tmp) / label.split()[0] / "base", shape=shape, dtype=torch.bfloat16)
            model_dir = extend_model_dir(base, base.parent / "ext", 300, progress=False)
            results = {
                mode: bench(model_dir, base.parent, mode, args.checkpoints)
                for mode in ("full", "projector", "new_embeddings")
            }
            weights = results["full"][0]
            print(f"\n{label}: LLM weights {weights / 1e6:.2f} MB (bf16), {args.checkpoints} checkpoints")
            print(
                f"  {'trainable':<16}{'1st ckpt MB':>12}{'later ckpt MB':>15}{'of it LLM MB':>14}{'run total MB':>14}"
                f"{'later / full':>14}"
            )
            full_later = sum(a for a, _ in results["full"][1][1:]) / (args.checkpoints - 1)
            for mode, (_, added) in results.items():
                later = sum(a for a, _ in added[1:]) / (args.checkpoints - 1)
                later_llm = sum(w for _, w in added[1:]) / (args.checkpoints - 1)
                print(
                    f"  {mode:<16}{added[0][0] / 1e6:>12.2f}{later / 1e6:>15.3f}{later_llm / 1e6:>14.3f}"
                    f"{sum(a for a, _ in added) / 1e6:>14.2f}{later / full_later:>14.4f}"
                )
    # extrapolation: a frozen LLM is written once; each later checkpoint adds what is not the LLM's weights
    extra = 11.5e6 + PROJECTOR_BYTES  # tokenizer.json (9.1 MB), original/tokenizer.model (2.2 MB), configs; projector
    print(f"\nextrapolated, {N_LONG_RUN} checkpoints (no optimizer state):")
    for name, llm in LLM_BYTES.items():
        full = N_LONG_RUN * (llm + extra)
        frozen = llm + N_LONG_RUN * extra
        print(f"  {name}: full {full / 1e9:.0f} GB, projector {frozen / 1e9:.1f} GB ({full / frozen:.0f}x less)")


if __name__ == "__main__":
    main()
