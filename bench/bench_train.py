"""Training-step cost of the ssi CPT recipe against torchtune's own full_finetune_single_device recipe.

Both recipes train the same tiny extended Llama (CPU, fp32) on the same interleaved CPT dataset (ssi's,
handed to torchtune's recipe as its dataset component) with the same batch size, optimizer and chunked
loss, for the same number of steps; each `train()` is timed in this process, alternating, best of
`--repeats`. Target (issue 4): ssi / torchtune <= 1.05.

Then packed vs padded batches on MLS-like lengths (~15 s utterances at 50 Hz): useful (non-padding)
tokens per second of the ssi recipe with `data.packing.enabled` on and off.

    python bench/bench_train.py [--steps 40] [--repeats 3] [--workdir /tmp/ssi-bench-train]

With `--device cuda`: throughput of a Llama-3.2-1B-shaped model (random weights, real shape, vocabulary
128,256 + 5,002) training CPT in bf16 mixed precision on MLS-like sequences, padded and packed, with
`compile` off and on: useful tokens/s, MFU (ssi.train.flops) and peak GPU memory per configuration, after
`--warmup` steps (compilation) that are not counted. `--device cpu --shape tiny` runs the same path on
the tiny model (a check of the plumbing, not a figure).

    python bench/bench_train.py --device cuda [--steps 30] [--batch 8] [--nproc 1]

With `--trainable`: full training vs `trainable=new_embeddings` vs `trainable=lora` (rank 8, all seven
projections, new rows trained) on the 1B shape, each in a process of its own: trained parameters,
optimizer-state bytes, peak memory (process RSS on the CPU, GPU memory with `--device cuda`) and step time,
as ratios to full training measured in the same run. On CUDA: bf16 mixed precision, the recipe's default.
On the CPU: fp32 (CPUs without bf16 units multiply bf16 ~200x slower than fp32), where full training of
all 16 layers (20 GB of weights, gradients and AdamW states) does not fit a 24 GB machine: `--layers`
keeps the 1B's widths and vocabulary with fewer layers.

    python bench/bench_train.py --trainable [--device cuda] [--layers 16] [--steps 3] [--batch 1] [--seq-len 512]
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import torchtune
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ssi.data.config import build_dataset
from ssi.data.synthetic import SyntheticSpec, make_synthetic_dataset
from ssi.files import read_json
from ssi.run_dir import read_metrics
from ssi.testing import LLAMA_3_2_1B, LlamaShape, write_llama_dir
from ssi.train.recipe import SpeechTrainingRecipe
from ssi.vocab.extend import extend_model_dir

REPO = Path(__file__).resolve().parents[1]


def torchtune_dataset(tokenizer, preset: dict):
    """torchtune dataset component: ssi's CPT training split (torchtune passes its tokenizer first)."""
    return build_dataset(OmegaConf.create(preset), "train", tokenizer).dataset


def ssi_cfg(model_dir: Path, corpus: Path, out: Path, steps: int, batch: int, *extra: str):
    overrides = [
        "size=tiny",
        "data=cpt/synthetic",
        f"data.train.dataset.source={corpus}",
        f"model={model_dir}",
        f"output_dir={out}",
        f"max_steps={steps}",
        f"save_steps={steps}",
        "eval_steps=100000",
        "progress=false",
        "log_steps=100000",
        f"data.train.dataloader.batch_size={batch}",
        "clip_grad_norm=null",
        "lr_scheduler.num_warmup_steps=2",
        *extra,
    ]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return compose(config_name="cpt", overrides=overrides)


def torchtune_cfg(model_dir: Path, preset: dict, out: Path, steps: int, batch: int, lr: float):
    config = read_json(model_dir / "config.json")
    return OmegaConf.create(
        {
            "output_dir": str(out),
            "tokenizer": {"_component_": "ssi.vocab.tiktoken.load_tokenizer", "model_dir": str(model_dir)},
            "dataset": {"_component_": "bench_train.torchtune_dataset", "preset": preset},
            "seed": 42,
            "shuffle": True,
            "batch_size": batch,
            "model": {
                "_component_": "torchtune.models.llama3_2._component_builders.llama3_2",
                "vocab_size": config["vocab_size"],
                "num_layers": config["num_hidden_layers"],
                "num_heads": config["num_attention_heads"],
                "num_kv_heads": config["num_key_value_heads"],
                "embed_dim": config["hidden_size"],
                "max_seq_len": preset["sequence"]["max_seq_len"],
                "intermediate_dim": config["intermediate_size"],
                "rope_base": config["rope_theta"],
                "scale_factor": config["rope_scaling"]["factor"],
                "tie_word_embeddings": config["tie_word_embeddings"],
            },
            "checkpointer": {
                "_component_": "torchtune.training.FullModelHFCheckpointer",
                "checkpoint_dir": str(model_dir),
                "checkpoint_files": ["model.safetensors"],
                "recipe_checkpoint": None,
                "output_dir": str(out),
                "model_type": "LLAMA3_2",
            },
            "resume_from_checkpoint": False,
            "optimizer": {
                "_component_": "torch.optim.AdamW",
                "lr": lr,
                "weight_decay": 0.01,
                "betas": [0.9, 0.95],
                "fused": False,
            },
            "lr_scheduler": {
                "_component_": "torchtune.training.lr_schedulers.get_cosine_schedule_with_warmup",
                "num_warmup_steps": 2,
            },
            "loss": {"_component_": "torchtune.modules.loss.CEWithChunkedOutputLoss"},
            "epochs": 1,
            "max_steps_per_epoch": steps,
            "gradient_accumulation_steps": 1,
            "optimizer_in_bwd": False,
            "clip_grad_norm": None,
            "compile": False,
            "device": "cpu",
            "dtype": "fp32",
            "enable_activation_checkpointing": False,
            "enable_activation_offloading": False,
            "metric_logger": {"_component_": "torchtune.training.metric_logging.DiskLogger", "log_dir": str(out)},
            "log_every_n_steps": 100000,
            "log_peak_memory_stats": False,
            "profiler": {"_component_": "torchtune.training.setup_torch_profiler", "enabled": False},
        }
    )


def timed_train(recipe) -> float:
    """Wall seconds of `recipe.train()` alone (set-up excluded), then its cleanup."""
    start = time.perf_counter()
    recipe.train()
    elapsed = time.perf_counter() - start
    recipe.cleanup()
    return elapsed


def time_ssi(cfg) -> float:
    shutil.rmtree(cfg.output_dir, ignore_errors=True)
    recipe = SpeechTrainingRecipe(cfg, "cpt")
    recipe.setup()
    return timed_train(recipe)


def time_torchtune(cfg) -> float:
    # torchtune ships its recipes as files beside the package, deliberately not importable by name
    path = Path(torchtune.__file__).parent.parent / "recipes" / "full_finetune_single_device.py"
    spec = importlib.util.spec_from_file_location("torchtune_full_finetune_single_device", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    shutil.rmtree(cfg.output_dir, ignore_errors=True)
    recipe = module.FullFinetuneRecipeSingleDevice(cfg)
    recipe.setup(cfg)
    return timed_train(recipe)


def useful_tokens_per_second(cfg) -> float:
    time_ssi(cfg)
    steps = read_metrics(cfg.output_dir)
    useful = sum(m["text_tokens"] + m["dsu_tokens"] + m["special_tokens"] for m in steps.values())
    seconds = sum(
        (m["text_tokens"] + m["dsu_tokens"] + m["special_tokens"]) / m["tokens_per_second"] for m in steps.values()
    )
    return useful / seconds


def device_throughput(args: argparse.Namespace) -> None:
    """Tokens/s, MFU and peak memory of CPT on `args.device`, padded/packed x compile off/on."""
    work = args.workdir
    one_b = args.shape == "1b"
    n_dsus = 5000 if one_b else 300
    t0 = time.perf_counter()
    base = write_llama_dir(
        work / "base",
        shape=LLAMA_3_2_1B if one_b else LlamaShape(),
        dtype=torch.bfloat16,
        n_bpe=128000 if one_b else None,
    )
    model_dir = extend_model_dir(base, work / "model", n_dsus, progress=False)
    n_train = 4096 if one_b else 64  # the tiny plumbing check trains a handful of steps
    spec = SyntheticSpec(n_train=n_train, n_validation=8, n_test=8, n_units=n_dsus, min_words=25, max_words=55)
    corpus = make_synthetic_dataset(work / "corpus", spec, progress=False)
    print(f"{args.shape} model and MLS-like corpus ready in {time.perf_counter() - t0:.0f} s")
    steps = args.warmup + args.steps
    print(f"CPT on {args.device}, bf16 mixed precision, batch {args.batch} x 2048 tokens, {args.steps} timed steps")
    print(f"{'batches':<8}{'compile':>8}{'tokens/s':>12}{'MFU':>8}{'peak GiB':>10}")
    for packed in (False, True):
        for compiled in (False, True) if args.compile == "both" else (False,):
            extra = [
                f"device={args.device}",
                "dtype=bf16",
                "mixed_precision=true",
                f"data.encoder.n_units={n_dsus}",
                "data.sequence.max_seq_len=2048",
                "data.train.dataloader.num_workers=2",
                "data.train.dataloader.pad_to_multiple_of=64",
                "log_steps=1",
                f"data.packing.enabled={packed}",
                f"compile={compiled}",
            ]
            out = work / f"run-{'packed' if packed else 'padded'}-{'compiled' if compiled else 'eager'}"
            time_ssi(ssi_cfg(model_dir, corpus, out, steps, args.batch, *extra))
            timed = [m for step, m in read_metrics(out).items() if step > args.warmup and "tokens_per_second" in m]
            useful = sum(m["text_tokens"] + m["dsu_tokens"] + m["special_tokens"] for m in timed)
            seconds = sum(
                (m["text_tokens"] + m["dsu_tokens"] + m["special_tokens"]) / m["tokens_per_second"] for m in timed
            )
            mfu = [m["mfu"] for m in timed if "mfu" in m]
            peak = max(m.get("peak_memory_gib", m.get("peak_rss_gib", 0.0)) for m in timed)
            mfu_text = f"{sum(mfu) / len(mfu):.1%}" if mfu else "n/a"
            print(
                f"{'packed' if packed else 'padded':<8}{'on' if compiled else 'off':>8}"
                f"{useful / seconds:>12.0f}{mfu_text:>8}{peak:>10.1f}",
                flush=True,
            )


TRAINABLE_MODES = {
    "full": ["trainable=full"],
    "new_embeddings": ["trainable=new_embeddings"],
    "lora": ["trainable=lora", "lora.rank=8"],
}


def one_trainable_mode(args: argparse.Namespace) -> None:
    """One mode of the `--trainable` table, in this process (its peak RSS is this process's): prints JSON."""
    work, device = args.workdir, args.device or "cpu"
    precision = ["dtype=bf16", "mixed_precision=true"] if device == "cuda" else ["dtype=fp32"]
    extra = [
        f"device={device}",
        *precision,
        "data.encoder.n_units=5000",
        f"data.sequence.max_seq_len={args.seq_len}",
        "log_steps=1",
        *TRAINABLE_MODES[args.one_trainable],
    ]
    out = work / f"run-{args.one_trainable}"
    cfg = ssi_cfg(work / "model", work / "corpus", out, args.warmup + args.steps, args.batch, *extra)
    recipe = SpeechTrainingRecipe(cfg, "cpt")
    recipe.setup()
    trained = sum(p.numel() for p in recipe.model.parameters() if p.requires_grad)
    recipe.train()
    optimizer_bytes = sum(
        t.numel() * t.element_size()
        for per_param in recipe.optimizer.state.values()
        for t in per_param.values()
        if isinstance(t, torch.Tensor)
    )
    recipe.cleanup()
    timed = [m for step, m in read_metrics(out).items() if step > args.warmup and "tokens_per_second" in m]
    seconds = sorted((m["text_tokens"] + m["dsu_tokens"] + m["special_tokens"]) / m["tokens_per_second"] for m in timed)
    peak = max(m.get("peak_memory_gib", m.get("peak_rss_gib", 0.0)) for m in timed)
    result = {
        "trained": trained,
        "optimizer_bytes": optimizer_bytes,
        "peak_gib": peak,
        "step_s": seconds[len(seconds) // 2],
    }
    print(json.dumps(result), flush=True)


def compare_trainable(args: argparse.Namespace) -> None:
    """The `--trainable` table: each mode in a subprocess, ratios to full training."""
    work, device = args.workdir, args.device or "cpu"
    t0 = time.perf_counter()
    shape = dataclasses.replace(LLAMA_3_2_1B, num_layers=args.layers)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    base = write_llama_dir(work / "base", shape=shape, dtype=dtype, n_bpe=128000)
    extend_model_dir(base, work / "model", 5000, progress=False)
    spec = SyntheticSpec(n_train=256, n_validation=8, n_test=8, n_units=5000, min_words=25, max_words=55)
    make_synthetic_dataset(work / "corpus", spec, progress=False)
    shutil.rmtree(base)
    layers = f"{args.layers} of 16 layers" if args.layers != LLAMA_3_2_1B.num_layers else "16 layers"
    print(
        f"1B-shaped model ({layers}, vocabulary 128,256 + 5,002) and corpus ready in {time.perf_counter() - t0:.0f} s"
    )
    precision = "bf16 mixed precision (fp32 master weights)" if device == "cuda" else "fp32"
    print(f"CPT on {device}, {precision}, batch {args.batch} x {args.seq_len} tokens, median of {args.steps} steps")
    results = {}
    for mode in TRAINABLE_MODES:
        command = [sys.executable, __file__, "--one-trainable", mode, "--workdir", str(work)]
        command += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch)]
        command += ["--seq-len", str(args.seq_len), *(["--device", args.device] if args.device else [])]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{mode}: {done.stderr[-2000:]}")
        results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    full = results["full"]
    memory = "peak GPU GiB" if device == "cuda" else "peak RSS GiB"
    print(f"{'trainable':<16}{'trained params':>16}{'optimizer GiB':>15}{memory:>14}{'s/step':>9}   ratios to full")
    for mode, r in results.items():
        gib = r["optimizer_bytes"] / 2**30
        ratios = (
            f"params {r['trained'] / full['trained']:.4f}"
            f", optimizer {r['optimizer_bytes'] / full['optimizer_bytes']:.4f}"
            f", memory {r['peak_gib'] / full['peak_gib']:.2f}, time {r['step_s'] / full['step_s']:.2f}"
        )
        print(
            f"{mode:<16}{r['trained']:>16,}{gib:>15.3f}{r['peak_gib']:>14.2f}{r['step_s']:>9.2f}   {ratios}", flush=True
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/ssi-bench-train"))
    parser.add_argument("--device", default=None, help="cuda (or cpu): the device throughput table instead")
    parser.add_argument("--shape", choices=("1b", "tiny"), default="1b", help="model of the device table")
    parser.add_argument("--warmup", type=int, default=5, help="device table: untimed first steps (compilation)")
    parser.add_argument("--compile", choices=("both", "off"), default="both", help="device table: compile on too")
    parser.add_argument("--trainable", action="store_true", help="full vs new_embeddings vs lora on the 1B shape")
    parser.add_argument("--seq-len", type=int, default=512, help="--trainable: max sequence length")
    parser.add_argument("--layers", type=int, default=16, help="--trainable: decoder layers of the 1B shape")
    parser.add_argument("--one-trainable", choices=tuple(TRAINABLE_MODES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.one_trainable is not None:
        one_trainable_mode(args)
        return
    shutil.rmtree(args.workdir, ignore_errors=True)
    if args.trainable:
        compare_trainable(args)
        shutil.rmtree(args.workdir, ignore_errors=True)
        return
    if args.device is not None:
        device_throughput(args)
        shutil.rmtree(args.workdir, ignore_errors=True)
        return
    work = args.workdir
    model_dir = extend_model_dir(write_llama_dir(work / "base"), work / "model", 300, progress=False)
    corpus = make_synthetic_dataset(
        work / "corpus", SyntheticSpec(n_train=1024, n_validation=16, n_test=16), progress=False
    )

    base = ssi_cfg(model_dir, corpus, work / "ssi", args.steps, args.batch)
    preset = OmegaConf.to_container(base.data, resolve=True)
    tt = torchtune_cfg(model_dir, preset, work / "torchtune", args.steps, args.batch, float(base.optimizer.lr))
    ours, theirs = [], []
    for _ in range(args.repeats):
        theirs.append(time_torchtune(tt))
        ours.append(time_ssi(base))
    print(f"CPT step time, tiny model, batch {args.batch}, {args.steps} steps, best of {args.repeats}:")
    print(f"  torchtune full_finetune_single_device  {min(theirs) / args.steps * 1e3:8.1f} ms/step")
    print(f"  ssi recipes/cpt.py                     {min(ours) / args.steps * 1e3:8.1f} ms/step")
    ratio = min(ours) / min(theirs)
    print(f"  ssi / torchtune = {ratio:.3f}  (target <= 1.05) {'OK' if ratio <= 1.05 else 'MISSED'}")

    mls_spec = SyntheticSpec(n_train=256, n_validation=8, n_test=8, min_words=25, max_words=55)
    mls = make_synthetic_dataset(work / "mls-like", mls_spec, progress=False)
    long = ["data.sequence.max_seq_len=2048"]
    padded = useful_tokens_per_second(ssi_cfg(model_dir, mls, work / "padded", args.steps, 4, *long, "log_steps=1"))
    packed = useful_tokens_per_second(
        ssi_cfg(model_dir, mls, work / "packed", args.steps, 2, *long, "log_steps=1", "data.packing.enabled=true")
    )
    print("Useful (non-padding) tokens/s on MLS-like lengths (25-55 words, ~8-20 s at 50 Hz):")
    print(
        f"  padded batches {padded:10.0f}\n  packed batches {packed:10.0f}\n  packed / padded = {packed / padded:.2f}"
    )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
