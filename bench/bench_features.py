#!/usr/bin/env python
"""Cost of the continuous-features method (SLAM-ASR style: speech encoder -> frame-stacking projector -> Llama).

    python bench/bench_features.py [--device cpu] [--parts train,generate] [--backends torch,vllm]
    python bench/bench_features.py --device cuda      # HuBERT-large and Llama-3.2-1B shapes, bf16

Everything is built here with random weights (nothing downloads): a HuBERT directory, a Llama-3.2-shaped HF
directory and an audiofolder of synthetic utterances (`--seconds` on average, 0.75x-1.25x), read through the
same data pipeline (conf/data/sft/audio_folder.yaml, the ASR chat prompt with one AUDIO_SLOT position per
projector output) as `recipes/sft.py method=features` and `scripts/generate.py`.

1. Training step, split. `FeaturesMethod` is attached to the torchtune decoder as the recipe attaches it
   (meta build, `to_empty`, `model_state`, RoPE init); a batch of `--batch` utterances is one step: the
   decoder's forward (its embedding hooks run the frozen encoder and the projector and write the projected
   features into the audio slots), torchtune's chunked cross-entropy on the transcript positions, backward,
   AdamW. Hooks on the encoder and the projector time their forwards inside that step; the device is
   synchronised at every boundary. Median of `--steps` steps after `--warmup`. Each row is also given as a
   fraction of the median whole step: that fraction is the ratio to read (absolute ms depend on the
   machine). "LLM forward" is the decoder's forward minus the encoder's and the projector's; "backward"
   covers the LLM and the projector (the encoder is frozen). `--trainable full` trains the LLM too.

2. Generation. A checkpoint directory as the recipe writes it (LLM weights, speech_projector.safetensors,
   speech_method.json) is read back with `ssi.model.methods.from_checkpoint`; the test split's prompt
   embeddings are built once (`prompt_embeddings`: encoder + projector, timed apart) and handed to
   `generate_torch` and to `generate_vllm` (an engine started with `enable_prompt_embeds`), greedy,
   `--max-tokens` new tokens. Each backend is warmed up, then the fastest of `--repeats` runs counts; model
   loading and the engine start are excluded (reported apart). Reported per backend: utterances/s and
   speed against real time, for generation alone and end to end (prompt embeddings + generation), with
   x real time = audio seconds / wall seconds (higher is faster; RTF = wall / audio is its inverse, also
   printed), the vLLM / torch ratios, and how many greedy outputs agree token for token. Random weights
   seldom stop early, so both sides generate about `--max-tokens` tokens per prompt (tokens/s is printed).

Without a GPU these are CPU figures (fp32: CPUs without bf16 units are far slower in bf16; vLLM's CPU
build, with VLLM_CPU_KVCACHE_SPACE=1 GiB unless set) on `--threads 1` by default, for torch and for the vLLM
engine alike (VLLM_CPU_OMP_THREADS_BIND): vLLM-CPU's own binding keeps a core for its front end (one compute
core of two here) and, on a shared machine, two OpenMP threads on two cores stall on each other (a tiny
op then costs tens of ms). The prompt-embedding stage includes reading the embedding table from the
checkpoint's files, as `prompt_embeddings` does on every call. With `--device cuda` the defaults become the
real shapes (HuBERT-large, Llama-3.2-1B with its 128,256-token vocabulary), bf16 (autocast over fp32 weights
in training, the recipe's mixed precision), 15 s utterances; the CUDA `vllm` build is needed for vLLM there.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import logging
import os
import shutil
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from timing import best_of  # bench/timing.py (this folder is on sys.path when run as a script)
from torchtune import training
from torchtune.modules.loss import CEWithChunkedOutputLoss

from ssi.data.collate import collate_audio
from ssi.data.config import build_dataset
from ssi.encode.fixtures import Clip, write_audiofolder, write_hubert_like, write_tiny_hubert
from ssi.generate.prompts import Prompt, build_prompts
from ssi.generate.sampling import Completion, SamplingOptions
from ssi.model import methods
from ssi.model.builder import build_model
from ssi.model.checkpointer import MODEL_KEY, SpeechCheckpointer
from ssi.model.methods.features import PROJECTOR, FeatureSettings, FeaturesMethod
from ssi.testing import LLAMA_3_2_1B, LlamaShape, write_llama_dir
from ssi.train.recipe import shift_labels
from ssi.vocab.tiktoken import load_base_tokenizer

REPO = Path(__file__).resolve().parents[1]
SAMPLING_RATE = 16000
TINY_LLM = LlamaShape(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=1)  # head_dim 64, as vLLM-CPU likes
# Per-device defaults of the flags left unset: small enough for a 2-core CPU, the real shapes on a GPU.
DEFAULTS: dict[str, dict[str, Any]] = {
    "cpu": {
        "encoder": "tiny",
        "llm": "tiny",
        "batch": 4,
        "seconds": 4.0,
        "n_prompts": 16,
        "max_tokens": 32,
        "threads": 1,
    },
    "cuda": {"encoder": "large", "llm": "1b", "batch": 8, "seconds": 15.0, "n_prompts": 64, "max_tokens": 64},
}


# --- fixtures --------------------------------------------------------------------------------------------
def write_encoder(path: Path, preset: str, hidden: int | None, layers: int | None) -> Path:
    """A random HuBERT directory. `tiny`: ssi's test fixture (32-channel convolutions); `large`: HuBERT-large's
    geometry (7 convolutions of 512 channels, 24 layers of 1024, FFN 4096, 16 heads), both with the layer-norm
    front end and an attention mask, so batches run padded. `hidden`/`layers` override the preset's."""
    if preset == "tiny":
        return write_tiny_hubert(path, hidden_size=hidden or 64, layers=layers or 4)
    return write_hubert_like(path, hidden_size=hidden or 1024, layers=layers or 24)


def llm_shape(preset: str, hidden: int | None, layers: int | None) -> tuple[LlamaShape, int | None]:
    """The decoder's shape and BPE size (None: the shipped 2,000-rank file) of `--llm`, with overrides."""
    shape, n_bpe = (LLAMA_3_2_1B, 128000) if preset == "1b" else (TINY_LLM, None)
    if hidden is not None:
        heads = max(1, hidden // 64)
        shape = dataclasses.replace(
            shape, hidden_size=hidden, num_heads=heads, num_kv_heads=min(shape.num_kv_heads, heads)
        )
    if layers is not None:
        shape = dataclasses.replace(shape, num_layers=layers)
    return shape, n_bpe


def write_corpus(folder: Path, n_train: int, n_test: int, seconds: float) -> Path:
    """An audiofolder with `train/` and `test/` splits of 16 kHz clips of 0.75-1.25 x `seconds`."""
    for split, n in (("train", n_train), ("test", n_test)):
        lengths = np.linspace(0.75 * seconds, 1.25 * seconds, n) if n > 1 else [seconds]
        write_audiofolder(folder / split, [Clip(f"{split}{i:04d}", round(float(s), 3)) for i, s in enumerate(lengths)])
    return folder


def data_config(corpus: Path, llm_dir: Path, encoder_dir: Path) -> DictConfig:
    """The `data` section a `method=features data=sft/audio_folder` run composes."""
    overrides = [
        "method=features",
        "data=sft/audio_folder",
        f"data.train.dataset.source={corpus}",
        f"model={llm_dir}",
        f"speech_encoder.model={encoder_dir}",
    ]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return compose(config_name="sft", overrides=overrides).data


# --- timing ------------------------------------------------------------------------------------------------
class Stopwatch:
    """Accumulated wall time per named span, with the device synchronised at every boundary."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.spans: dict[str, float] = defaultdict(float)
        self._open: dict[str, float] = {}

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def time_module(self, module: torch.nn.Module, name: str) -> None:
        """Add every forward of `module` to span `name` (forward pre-hook and forward hook)."""

        def start(*_: Any) -> None:
            self._open[name] = self.now()

        def stop(*_: Any) -> None:
            self.spans[name] += self.now() - self._open.pop(name)

        module.register_forward_pre_hook(start)
        module.register_forward_hook(stop)

    def take(self) -> dict[str, float]:
        spans, self.spans = dict(self.spans), defaultdict(float)
        return spans


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --- 1. training step --------------------------------------------------------------------------------------
def build_decoder(method: FeaturesMethod, llm_dir: Path, max_seq_len: int, device: torch.device) -> torch.nn.Module:
    """The torchtune decoder with the method attached and the LLM's weights plus the initial projector, as the
    recipe's `_setup_model` does it (fp32 parameters; mixed precision autocasts around the forward)."""
    checkpointer = SpeechCheckpointer(llm_dir, progress=False, extended=False)
    with training.set_default_dtype(torch.float32), torch.device("meta"):
        model = build_model(checkpointer.architecture, max_seq_len)
        method.attach(model)
    model.to_empty(device=device)
    weights = {k: v.float() for k, v in checkpointer.load_checkpoint()[MODEL_KEY].items()}
    model.load_state_dict(method.model_state(weights, None), strict=True)
    with device:  # the RoPE caches are buffers: computed where they now live
        for module in model.modules():
            if hasattr(module, "rope_init"):
                module.rope_init()
    return model


def training_split(args: argparse.Namespace, parts: dict[str, Path], device: torch.device) -> None:
    """Print the median training step split into encoder, projector, LLM forward, loss, backward, optimizer."""
    mixed = args.dtype == "bf16"
    settings = FeatureSettings(
        str(parts["encoder"]), layer=args.layer, downsample=args.downsample, hidden=args.projector_hidden
    )
    llm_dim = SpeechCheckpointer(parts["llm"], progress=False, extended=False).architecture.embed_dim
    method = FeaturesMethod(settings, llm_dim, compute_dtype=torch.bfloat16 if mixed else torch.float32)
    tokenizer = load_base_tokenizer(parts["llm"])
    dataset = build_dataset(parts["data"], "train", tokenizer, audio_slots=method.audio_slots).dataset
    batch = collate_audio([dataset[i] for i in range(args.batch)], tokenizer.pad_id, tokenizer.base_vocab_size, 8)
    labels = shift_labels(batch["labels"]).to(device)
    model = build_decoder(method, parts["llm"], batch["tokens"].shape[1], device)
    for name, p in model.named_parameters():
        p.requires_grad_(args.trainable == "full" or method.is_trained(name))
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-5, fused=device.type == "cuda")
    loss_fn = CEWithChunkedOutputLoss(num_output_chunks=8)
    model.set_num_output_chunks(8)
    clock = Stopwatch(device)
    clock.time_module(method.encoder, "encoder")
    clock.time_module(getattr(model, PROJECTOR), "projector")
    model.train()
    steps: list[dict[str, float]] = []
    for step in range(args.warmup + args.steps):
        t0 = clock.now()
        tokens = method.decoder_inputs(batch, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mixed):
            outputs = model(tokens)
            t1 = clock.now()
            loss = loss_fn(outputs, labels)
        t2 = clock.now()
        loss.backward()
        t3 = clock.now()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t4 = clock.now()
        inside = clock.take()
        if step >= args.warmup:
            steps.append(
                {
                    "encoder forward": inside["encoder"],
                    "projector forward": inside["projector"],
                    "LLM forward": t1 - t0 - inside["encoder"] - inside["projector"],
                    "loss (chunked CE)": t2 - t1,
                    "backward": t3 - t2,
                    "optimizer step": t4 - t3,
                    "whole step": t4 - t0,
                }
            )
    medians = {name: statistics.median(s[name] for s in steps) for name in steps[0]}
    whole = medians["whole step"]
    n_slots = int((batch["tokens"] == -1).sum())
    n_labels = int((labels != -100).sum())
    print(
        f"training step on {device.type}, {'bf16 autocast over fp32 weights' if mixed else 'fp32'}: batch "
        f"{args.batch} utterances ({sum(len(w) for w in batch['audio']) / SAMPLING_RATE:.1f} s of audio) x "
        f"{batch['tokens'].shape[1]} positions ({n_slots} audio slots, {n_labels} labelled), trainable="
        f"{args.trainable}, median of {args.steps} steps after {args.warmup}"
    )
    print(f"  {method.describe()}")
    projector = n_params(getattr(model, PROJECTOR))
    print(
        f"  parameters: encoder {n_params(method.encoder) / 1e6:.2f} M (frozen), projector {projector / 1e6:.2f} M, "
        f"LLM {(n_params(model) - projector) / 1e6:.2f} M; trained {sum(p.numel() for p in trained) / 1e6:.2f} M"
    )
    print()
    print("| part of the step | ms | share of the step |")
    print("|---|---:|---:|")
    for name, seconds in medians.items():
        print(f"| {name} | {seconds * 1e3:.1f} | {seconds / whole:.1%} |")
    llm = medians["LLM forward"] + medians["loss (chunked CE)"] + medians["backward"]
    print()
    print(
        f"encoder : projector : LLM forward/backward : optimizer = {medians['encoder forward'] / whole:.1%} : "
        f"{medians['projector forward'] / whole:.1%} : {llm / whole:.1%} : {medians['optimizer step'] / whole:.1%} "
        "of the median step"
    )
    print()


# --- 2. generation -----------------------------------------------------------------------------------------
def write_checkpoint(args: argparse.Namespace, parts: dict[str, Path]) -> Path:
    """A checkpoint directory as the recipe saves one: the LLM's files plus the method's (initial projector)."""
    checkpoint = shutil.copytree(parts["llm"], parts["root"] / "checkpoint")
    settings = FeatureSettings(
        str(parts["encoder"]), layer=args.layer, downsample=args.downsample, hidden=args.projector_hidden
    )
    llm_dim = SpeechCheckpointer(checkpoint, progress=False, extended=False).architecture.embed_dim
    method = FeaturesMethod(settings, llm_dim)
    projector = method.new_projector()
    method.write_files(checkpoint, {f"{PROJECTOR}.{k}": v for k, v in projector.state_dict().items()})
    return checkpoint


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def generation(args: argparse.Namespace, parts: dict[str, Path], device: torch.device) -> None:
    """Print utterances/s and speed against real time of each backend, and their ratios."""
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    checkpoint = write_checkpoint(args, parts)
    method = methods.from_checkpoint(checkpoint)
    assert isinstance(method, FeaturesMethod)
    tokenizer = load_base_tokenizer(checkpoint)
    prompts: list[Prompt] = build_prompts(parts["data"], "test", "test", tokenizer, False, method.audio_slots)
    token_lists = [p.token_ids for p in prompts]
    audio_seconds = sum(len(p.audio) for p in prompts) / method.encoder.sampling_rate
    sampling = SamplingOptions(max_tokens=args.max_tokens)
    max_model_len = max(map(len, token_lists)) + args.max_tokens
    stop_ids = list(tokenizer.stop_tokens)

    def embed() -> list[torch.Tensor]:
        embeds = method.prompt_embeddings(token_lists, [p.audio for p in prompts], checkpoint, device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return embeds

    embed()  # warm-up
    t0 = time.perf_counter()
    embeds = [e.to(dtype) for e in embed()]
    embed_seconds = time.perf_counter() - t0
    method.encoder.to("cpu")
    free_memory(device)
    results: dict[str, tuple[float, list[Completion]]] = {}
    setup: dict[str, float] = {}
    if "torch" in args.backends:
        results["torch"], setup["torch"] = run_torch(
            args, checkpoint, token_lists, embeds, sampling, max_model_len, stop_ids, tokenizer.pad_id, device, dtype
        )
        free_memory(device)
    if "vllm" in args.backends:
        results["vllm"], setup["vllm"] = run_vllm(
            args, checkpoint, token_lists, embeds, sampling, max_model_len, stop_ids, dtype
        )

    hardware = f"CUDA ({torch.cuda.get_device_name()})" if device.type == "cuda" else "CPU"
    lengths = sorted(map(len, token_lists))
    print(
        f"generation on {hardware}, {args.dtype}: {len(prompts)} utterances, {audio_seconds:.1f} s of audio, "
        f"prompts of {lengths[0]}-{lengths[-1]} positions, greedy, at most {args.max_tokens} new tokens; "
        f"torch batch {args.torch_batch}; fastest of {args.repeats} after a warm-up"
    )
    print("x real time = audio seconds / wall seconds (higher is faster); RTF = wall / audio (its inverse)")
    print()
    print("| stage | wall s | utterances/s | x real time | RTF | generated tokens/s |")
    print("|---|---:|---:|---:|---:|---:|")
    n = len(prompts)
    print(
        f"| prompt embeddings (encoder + projector, {device.type}) | {embed_seconds:.2f} | {n / embed_seconds:.1f} | "
        f"{audio_seconds / embed_seconds:.1f} | {embed_seconds / audio_seconds:.4f} | |"
    )
    for name, (seconds, outputs) in results.items():
        tokens = sum(len(o.token_ids) for o in outputs)
        for label, wall in ((f"{name}: generation", seconds), (f"{name}: end to end", seconds + embed_seconds)):
            print(
                f"| {label} | {wall:.2f} | {n / wall:.1f} | {audio_seconds / wall:.1f} | {wall / audio_seconds:.4f} "
                f"| {tokens / wall:.0f} |"
            )
    print()
    for name, seconds in setup.items():
        print(
            f"{name} set-up (not in the rates): {seconds:.1f} s ({'engine start' if name == 'vllm' else 'model load'})"
        )
    if {"torch", "vllm"} <= set(results):
        (t_torch, by_torch), (t_vllm, by_vllm) = results["torch"], results["vllm"]
        same = sum(a.token_ids == b.token_ids for a, b in zip(by_torch, by_vllm, strict=True))
        print(
            f"vllm / torch: utterances/s {t_torch / t_vllm:.2f}x in generation, "
            f"{(t_torch + embed_seconds) / (t_vllm + embed_seconds):.2f}x end to end"
        )
        print(f"greedy outputs identical token for token: {same}/{n}")
        finished = {k: sum(o.finish_reason == "stop" for o in out) for k, (_, out) in results.items()}
        print(f"ended on a stop token before max_tokens: torch {finished['torch']}, vllm {finished['vllm']}")


def run_torch(
    args: argparse.Namespace,
    checkpoint: Path,
    prompts: list[list[int]],
    embeds: list[torch.Tensor],
    sampling: SamplingOptions,
    max_model_len: int,
    stop_ids: list[int],
    pad_id: int,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[tuple[float, list[Completion]], float]:
    """(fastest seconds, outputs) of `generate_torch` from the prompt embeddings, and the model's load time."""
    from ssi.generate.torch_backend import generate_torch
    from ssi.model.engines import load_torch_model

    t0 = time.perf_counter()
    model = load_torch_model(
        SpeechCheckpointer(checkpoint, progress=False, extended=False), max_model_len, device, dtype
    )
    load_seconds = time.perf_counter() - t0

    def run(indices: range) -> list[Completion]:
        return generate_torch(
            model,
            [prompts[i] for i in indices],
            stop_ids=stop_ids,
            pad_id=pad_id,
            sampling=sampling,
            max_model_len=max_model_len,
            batch_size=args.torch_batch,
            device=device,
            dtype=dtype,
            progress=False,
            prompt_embeds=[embeds[i] for i in indices],
        )

    run(range(min(2, len(prompts))))  # warm-up: allocator and kernels
    return best_of(args.repeats, lambda: run(range(len(prompts)))), load_seconds


def run_vllm(
    args: argparse.Namespace,
    checkpoint: Path,
    prompts: list[list[int]],
    embeds: list[torch.Tensor],
    sampling: SamplingOptions,
    max_model_len: int,
    stop_ids: list[int],
    dtype: torch.dtype,
) -> tuple[tuple[float, list[Completion]], float]:
    """(fastest seconds, outputs) of `generate_vllm` from the prompt embeddings, and the engine's start time."""
    from ssi.generate.vllm_backend import generate_vllm
    from ssi.model.engines import start_vllm, stop_vllm

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # read when vllm is first imported (start_vllm)
    if not torch.cuda.is_available():
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM-CPU's default is far more than needed
        if args.threads is not None:  # the engine computes on as many cores as the torch backend
            cores = sorted(os.sched_getaffinity(0))[: args.threads]
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, cores)))
    t0 = time.perf_counter()
    # 0.8 of the GPU: this process keeps its CUDA context and allocator cache beside the engine
    llm = start_vllm(
        checkpoint,
        max_model_len=max_model_len,
        dtype=dtype,
        gpu_memory_utilization=0.8 if torch.cuda.is_available() else None,
        engine_kwargs={"enable_prompt_embeds": True},
    )
    start_seconds = time.perf_counter() - t0

    def run(indices: range) -> list[Completion]:
        return generate_vllm(
            llm,
            [prompts[i] for i in indices],
            stop_ids=stop_ids,
            sampling=sampling,
            max_model_len=max_model_len,
            progress=False,
            prompt_embeds=[embeds[i] for i in indices],
        )

    try:
        run(range(min(2, len(prompts))))
        return best_of(args.repeats, lambda: run(range(len(prompts)))), start_seconds
    finally:
        stop_vllm(llm)


# --- main ----------------------------------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="default: fp32 on cpu, bf16 on cuda")
    parser.add_argument("--parts", default="train,generate", help="comma-separated: train, generate")
    parser.add_argument("--backends", default="torch,vllm", help="comma-separated generation backends: torch, vllm")
    parser.add_argument("--encoder", choices=("tiny", "large"), default=None, help="HuBERT preset (tiny on cpu)")
    parser.add_argument("--encoder-hidden", type=int, default=None, help="overrides the preset's (tiny 64, large 1024)")
    parser.add_argument("--encoder-layers", type=int, default=None, help="overrides the preset's (tiny 4, large 24)")
    parser.add_argument("--layer", type=int, default=-1, help="speech_encoder.layer (-1: the encoder's output)")
    parser.add_argument("--downsample", type=int, default=5, help="projector.downsample")
    parser.add_argument("--projector-hidden", type=int, default=2048, help="projector.hidden")
    parser.add_argument("--llm", choices=("tiny", "1b"), default=None, help="Llama preset (tiny: 256 x 4 layers)")
    parser.add_argument("--llm-hidden", type=int, default=None, help="overrides the preset's hidden size (head_dim 64)")
    parser.add_argument("--llm-layers", type=int, default=None, help="overrides the preset's layer count")
    parser.add_argument("--trainable", choices=("projector", "full"), default="projector")
    parser.add_argument("--batch", type=int, default=None, help="utterances per training step")
    parser.add_argument("--seconds", type=float, default=None, help="mean utterance length")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first training steps")
    parser.add_argument("--n-prompts", type=int, default=None, help="utterances to transcribe")
    parser.add_argument("--max-tokens", type=int, default=None, help="new tokens per utterance")
    parser.add_argument("--torch-batch", type=int, default=16, help="prompts per batch of the torch backend")
    parser.add_argument("--repeats", type=int, default=2, help="timed generation runs per backend; the fastest counts")
    parser.add_argument("--threads", type=int, default=None, help="CPU compute threads of torch and vLLM (cpu: 1)")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="working folder, emptied first and removed at the end (default: a temporary one)",
    )
    args = parser.parse_args()
    for key, value in DEFAULTS[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    args.parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    args.backends = {b.strip() for b in args.backends.split(",") if b.strip()}
    if not args.parts <= {"train", "generate"} or not args.backends <= {"torch", "vllm"}:
        parser.error("--parts takes train,generate and --backends torch,vllm")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device visible")
    return args


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench-features-"))
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    try:
        t0 = time.perf_counter()
        shape, n_bpe = llm_shape(args.llm, args.llm_hidden, args.llm_layers)
        dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
        parts = {
            "root": root,
            "encoder": write_encoder(root / "hubert", args.encoder, args.encoder_hidden, args.encoder_layers),
            "llm": write_llama_dir(root / "llm", shape=shape, dtype=dtype, n_bpe=n_bpe),
            "corpus": write_corpus(root / "corpus", args.batch, args.n_prompts, args.seconds),
        }
        parts["data"] = data_config(parts["corpus"], parts["llm"], parts["encoder"])
        print(
            f"fixtures ({args.encoder} HuBERT, {args.llm} Llama {shape.hidden_size} x {shape.num_layers} layers, "
            f"{args.batch + args.n_prompts} clips) ready in {time.perf_counter() - t0:.0f} s\n"
        )
        if "train" in args.parts:
            training_split(args, parts, device)
            free_memory(device)  # the decoder, its optimizer and the encoder go with the function's frame
        if "generate" in args.parts:
            generation(args, parts, device)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":  # vLLM's engine starts worker processes that re-import this module
    main()
