#!/usr/bin/env python
"""Units against features on the same utterances: does one method learn worse, and do dev loss and WER agree?

    python bench/bench_learning.py [--steps 300] [--eval-every 100] [--out <folder>]
    python bench/bench_learning.py --quick          # a smoke test of the bench (~30 s on 2 cores)

Why: on a tone corpus, 300 steps of trainable=full gave a LOWER dev loss for features (encoder layer 4) than for
units (0.13 vs 0.18) but a HIGHER greedy test WER (55% vs 45%). A method that is better teacher-forced and worse
when it generates is the signature of a train/generation mismatch, unless the runs simply saw different data.
This bench removes that excuse and prints both measures side by side, at several checkpoints of one run each.

Everything is built here (nothing downloads), the way a user builds it:
1. a spoken corpus (`write_spoken_corpus`: each word its own pair of tones; train / validation / test), a tiny
   random HuBERT, a k-means codebook on one of its layers (`train_kmeans`) and the three splits encoded with it
   (`encode_audio`, which keeps the audio's ids), a tiny Llama-3.2-shaped base extended with those units;
2. both methods trained through the real recipe (`SpeechTrainingRecipe`, in this process) on
   `data=sft/paired_folder` from the same extended model, `trainable=full`, with the same seed, steps, learning
   rate and schedule. Both batch by count (`batch_seconds=null` for features), so both draw the same seeded
   `GlobalBatchSampler` order over their rows: the bench checks by id that the rows and every micro-batch hold
   the same utterances, so both runs see the same audio at every step (the table shows the hours each counted:
   units count frames at 50 Hz, one fewer per utterance than samples / 320, so they read ~20 ms less each);
3. every checkpoint (`--eval-every`): the dev loss the recipe logged, the teacher-forced test loss through the
   training forward, greedy test WER (`run_generation`, torch backend), and the first answer token: the
   training forward's argmax (teacher-forced) against generation's first greedy token. Both see the same prompt,
   so they must agree; a disagreement is a mismatch between the training and the generation path.

Same utterances, steps and audio are not the same positions: a second of speech is 50 unit tokens but 10
projector positions (`--downsample 5`), and the paired preset gives features a text instruction units lack
(hence the text-token column).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from ssi.encode.fixtures import write_spoken_corpus, write_tiny_hubert
from ssi.encode.kmeans_training import train_kmeans
from ssi.encode.pipeline import encode_audio
from ssi.generate.pipeline import run_generation
from ssi.run_dir import GENERATIONS_FILE, list_checkpoints, read_metrics
from ssi.testing import write_llama_dir
from ssi.train.recipe import SpeechTrainingRecipe, shift_labels
from ssi.vocab.extend import extend_model_dir

REPO = Path(__file__).resolve().parents[1]
METHODS = ("units", "features")
SPLITS = ("train", "validation", "test")
# What the method ahead by WER says of features.
LEARNS = {"units": "features learns worse", "features": "features learns better", "neither": "alike"}
# The flags left unset take these; --quick checks every stage of the bench in a minute, too small to learn.
SIZES = {
    "default": {"steps": 300, "train": 256, "dev": 64, "test": 64, "units": 64},
    "quick": {"steps": 60, "train": 64, "dev": 16, "test": 16, "units": 32},
}


def quiet() -> contextlib.AbstractContextManager:
    """Keep what the project's commands print for a person at a terminal (next-step hints, log folders, one-line
    summaries) out of the bench's output: the table has the figures."""
    return contextlib.redirect_stdout(io.StringIO())


def compose_config(name: str, overrides: Sequence[str]) -> DictConfig:
    """conf/<name>.yaml with these overrides, as the scripts' Hydra entry points compose it."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return compose(config_name=name, overrides=list(overrides))


# --- 1. corpus, encoder, units, model ------------------------------------------------------------------------
@dataclass(frozen=True)
class Parts:
    audio: Path  # the audiofolder corpus (features read it)
    hubert: Path  # the speech encoder both methods read, at the same layer
    encoded: Path  # the same corpus as units (encode_audio's output_dir)
    model: Path  # the extended Llama both methods start from


def build_parts(args: argparse.Namespace, root: Path) -> Parts:
    """The corpus as audio and as units of one codebook, and the extended model, as docs/encoding.md makes them."""
    sizes = {"train": args.train, "validation": args.dev, "test": args.test}
    audio = write_spoken_corpus(root / "audio", sizes, seconds_per_word=args.seconds_per_word, seed=args.seed)
    hubert = write_tiny_hubert(root / "hubert", layers=args.encoder_layers)
    encoder = [
        f"encoder.model={hubert}",
        f"encoder.layer={args.layer}",
        f"encoder.n_units={args.units}",
        f"source={audio}",
        "device=cpu",
        "num_workers=1",
        "progress=false",
    ]
    kmeans = root / "kmeans.safetensors"
    with quiet():
        train_kmeans(compose_config("train_kmeans", [*encoder, "split=train", "sample.hours=null", f"output={kmeans}"]))
    encoded = root / "encoded"
    for split in SPLITS:
        overrides = [*encoder, f"encoder.kmeans={kmeans}", f"split={split}", f"output_dir={encoded}"]
        encode_audio(compose_config("encode_audio", overrides))
    base = write_llama_dir(root / "llama", dtype=torch.float32)
    model = extend_model_dir(base, root / f"llama-{args.units}-dsus", args.units, progress=False)
    return Parts(audio, hubert, encoded, model)


# --- 2. training -----------------------------------------------------------------------------------------------
def run_overrides(method: str, args: argparse.Namespace, parts: Parts, model: Path, out: Path) -> list[str]:
    """One cell of the paired sweep: everything but `method` is the same for both runs."""
    return [
        "size=tiny",
        f"method={method}",
        "data=sft/paired_folder",
        f"data.units_source={parts.encoded}",
        f"data.audio_source={parts.audio}",
        "data.train.dataloader.batch_seconds=null",  # features batch by count too: the same sampler as units
        f"data.train.dataloader.batch_size={args.batch}",
        f"model={model}",
        f"speech_encoder.model={parts.hubert}",
        f"speech_encoder.layer={args.layer}",
        f"projector.downsample={args.downsample}",
        f"projector.hidden={args.projector_hidden}",
        "trainable=full",
        f"seed={args.seed}",
        f"optimizer.lr={args.lr}",
        f"lr_scheduler.num_warmup_steps={args.warmup}",
        f"max_steps={args.steps}",
        f"save_steps={args.eval_every}",
        f"eval_steps={args.eval_every}",
        "log_steps=1",  # every step's label tokens: the answer tokens trained on
        f"output_dir={out}",
        "progress=false",
    ]


@dataclass
class Trained:
    run: Path
    row_ids: list[str]  # the training split's utterance ids in row order
    batches: list[list[str]]  # the utterance ids of each micro-batch trained on, in order
    sampler: str
    seconds: float


def train(method: str, args: argparse.Namespace, parts: Parts, root: Path) -> Trained:
    """Train one method through the recipe; read back which utterances each of its micro-batches held."""
    run = root / "runs" / method
    recipe = SpeechTrainingRecipe(compose_config("sft", run_overrides(method, args, parts, parts.model, run)), "sft")
    t0 = time.perf_counter()
    with quiet():
        recipe.setup()
    try:
        if recipe.train() != 0:
            raise SystemExit(f"{method}: training stopped early ({recipe.stop_reason})")
    finally:
        recipe.cleanup()
    seconds = time.perf_counter() - t0
    dataset, sampler = recipe.train_split.dataset, recipe.sampler
    row_ids = [dataset.build(i).id for i in range(len(dataset))]
    batches: list[list[str]] = []
    for epoch in range(recipe.epoch + 1):  # the order depends on (seed, epoch) only: replayed, not recorded
        sampler.set_epoch(epoch)
        batches += [[row_ids[i] for i in batch] for batch in sampler]
    return Trained(run, row_ids, batches[: args.steps * recipe.grad_accum], type(sampler).__name__, seconds)


# --- 3. evaluation ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FirstToken:
    """One test utterance's first answer token: the reference's, the training forward's argmax given the
    reference prompt (teacher-forced), and generation's first greedy token from its own prompt."""

    label: int
    teacher_forced: int
    greedy: int
    same_prompt: bool  # the training row starts with exactly the prompt generation built


@dataclass
class Point:
    method: str
    step: int
    audio_hours: float
    text_tokens: int
    answer_tokens: int  # labelled tokens trained on (the transcripts and their turn's header and end)
    dev_loss: float
    test_loss: float  # teacher-forced, through the training forward
    wer: float  # greedy, through generation
    first_tokens: list[FirstToken]


def greedy(checkpoint: Path, max_tokens: int) -> tuple[float, dict[str, tuple[list[int], int]]]:
    """Greedy test WER of a checkpoint through scripts/generate.py's path, and per utterance id its prompt and
    first generated token."""
    overrides = ["backend=torch", f"model={checkpoint}", f"sampling_params.max_tokens={max_tokens}", "progress=false"]
    with quiet():
        record = run_generation(compose_config("generate", overrides))
    rows = [json.loads(line) for line in (Path(record["output_dir"]) / GENERATIONS_FILE).read_text().splitlines()]
    return float(record["wer"]), {r["id"]: (r["prompt_token_ids"], r["output_token_ids"][0]) for r in rows}


@torch.no_grad()
def first_answer_tokens(recipe: SpeechTrainingRecipe, generated: dict[str, tuple[list[int], int]]) -> list[FirstToken]:
    """Each utterance of the recipe's dev loader at the position after generation's prompt, by the forward the
    recipe trains with (its autocast, its method's inputs)."""
    dataset = recipe.dev_split.dataset
    ids = iter([dataset.build(i).id for i in range(len(dataset))])  # the evaluation loader keeps dataset order
    recipe.model.eval()
    found = []
    for batch in recipe.dev_loader:
        labels = shift_labels(batch["labels"])
        tokens = recipe.method.decoder_inputs(batch, recipe.device)
        with torch.autocast(recipe.device.type, dtype=recipe.dtype, enabled=recipe.autocast):
            output = recipe.model(tokens)
        logits = torch.cat(output, dim=1) if isinstance(output, list) else output
        for row in range(len(labels)):
            prompt, first = generated[next(ids)]
            at = len(prompt) - 1  # the last prompt position predicts the first answer token
            found.append(
                FirstToken(
                    int(labels[row, at]),
                    int(logits[row, at].argmax()),
                    first,
                    batch["tokens"][row, : len(prompt)].tolist() == prompt,
                )
            )
    return found


def teacher_forced(overrides: list[str], generated: dict[str, tuple[list[int], int]]) -> tuple[float, list[FirstToken]]:
    """Test loss and first answer tokens of a checkpoint, by a recipe that starts from it (`model=<checkpoint>`,
    as a later stage would) with the test split as its dev split: the training path, not generation's."""
    recipe = SpeechTrainingRecipe(compose_config("sft", [*overrides, "data.dev.dataset.split=test"]), "sft")
    with quiet():
        recipe.setup()
    try:
        return recipe.evaluate(), first_answer_tokens(recipe, generated)
    finally:
        recipe.cleanup()


def evaluate(method: str, args: argparse.Namespace, parts: Parts, trained: Trained, root: Path) -> list[Point]:
    """Every checkpoint of a run: what it trained on and its dev loss (from the run's log), test loss and first
    answer tokens teacher-forced, greedy test WER."""
    metrics = read_metrics(trained.run)
    points = []
    for ckpt in list_checkpoints(trained.run):
        logged = metrics[ckpt.step]
        wer, generated = greedy(ckpt.path, args.max_tokens)
        scratch = root / "teacher_forced" / method / str(ckpt.step)
        test_loss, first_tokens = teacher_forced(run_overrides(method, args, parts, ckpt.path, scratch), generated)
        answer_tokens = sum(int(m.get("label_tokens", 0)) for step, m in metrics.items() if step <= ckpt.step)
        points.append(
            Point(
                method,
                ckpt.step,
                logged["consumed_audio_seconds"] / 3600,
                int(logged["consumed_text_tokens"]),
                answer_tokens,
                logged["dev_loss"],
                test_loss,
                wer,
                first_tokens,
            )
        )
    return points


# --- 4. report -------------------------------------------------------------------------------------------------
def same_utterances(runs: dict[str, Trained]) -> str:
    """Say whether both runs' rows and micro-batches hold the same utterance ids; refuse to go on if not."""
    units, features = runs["units"], runs["features"]
    if units.row_ids != features.row_ids or units.batches != features.batches:
        rows = sum(a == b for a, b in zip(units.row_ids, features.row_ids, strict=False))
        raise SystemExit(
            f"the two runs did not train on the same utterances: {rows}/{len(units.row_ids)} rows hold the same id; "
            f"micro-batches equal: {units.batches == features.batches}"
        )
    return (
        f"same utterances: the {len(units.row_ids)} training rows hold the same ids in the same order in both splits, "
        f"and all {len(units.batches)} micro-batches ({units.sampler} / {features.sampler}) hold the same ids"
    )


def first_token_figures(point: Point) -> str:
    """`teacher-forced accuracy / greedy accuracy (agreements)` on the test split's first answer token."""
    firsts, n = point.first_tokens, len(point.first_tokens)
    tf = sum(f.teacher_forced == f.label for f in firsts)
    gr = sum(f.greedy == f.label for f in firsts)
    agree = sum(f.teacher_forced == f.greedy for f in firsts)
    return f"{tf / n:.0%} / {gr / n:.0%} ({agree}/{n})"


def print_table(points: list[Point]) -> None:
    print(
        "| method | step | audio h seen | text tokens | answer tokens | dev loss | test loss (TF) | test WER (greedy) "
        "| 1st answer token: TF / greedy acc (agree) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for p in sorted(points, key=lambda p: (p.step, METHODS.index(p.method))):
        print(
            f"| {p.method} | {p.step} | {p.audio_hours:.4f} | {p.text_tokens:,} | {p.answer_tokens:,} | "
            f"{p.dev_loss:.4f} | {p.test_loss:.4f} | {p.wer:.1%} | {first_token_figures(p)} |"
        )


def ahead(units: float, features: float) -> str:
    """The method with the lower figure."""
    return "neither" if units == features else "features" if features < units else "units"


def ranking(by_loss: str, by_wer: str) -> str:
    """Whether dev loss and WER put the same method ahead (a tie in either leaves nothing to compare)."""
    if "neither" in (by_loss, by_wer):
        return "tie"
    return "agree" if by_loss == by_wer else "DISAGREE"


def verdict(points: list[Point]) -> str:
    """Which method is ahead by dev loss and by WER at the last checkpoint, at how many checkpoints the two
    measures rank the methods alike, and whether teacher-forced and greedy first tokens ever differ."""
    by_step: dict[int, dict[str, Point]] = {}
    for p in points:
        by_step.setdefault(p.step, {})[p.method] = p
    rankings = [
        ranking(
            ahead(pair["units"].dev_loss, pair["features"].dev_loss), ahead(pair["units"].wer, pair["features"].wer)
        )
        for pair in by_step.values()
    ]
    last = max(by_step)
    u, f = by_step[last]["units"], by_step[last]["features"]
    by_loss, by_wer = ahead(u.dev_loss, f.dev_loss), ahead(u.wer, f.wer)
    firsts = [t for p in points for t in p.first_tokens]
    differ = sum(t.teacher_forced != t.greedy for t in firsts)
    prompts = sum(not t.same_prompt for t in firsts)
    return (
        f"verdict at step {last} (same utterances, steps and audio): greedy WER features {f.wer:.1%} vs units "
        f"{u.wer:.1%} ({100 * (f.wer - u.wer):+.1f} points: {LEARNS[by_wer]}); dev loss features {f.dev_loss:.4f} vs "
        f"units {u.dev_loss:.4f} ({by_loss} ahead); dev loss and WER rankings: {ranking(by_loss, by_wer)} "
        f"(agree at {rankings.count('agree')}, disagree at {rankings.count('DISAGREE')}, tie at "
        f"{rankings.count('tie')} of {len(rankings)} checkpoints). Teacher-forced and greedy first answer tokens "
        f"differ {differ} times in {len(firsts)}{' (a train/generation mismatch)' if differ else ''}; generation "
        f"prompts unlike the training rows: {prompts}"
    )


# --- main ------------------------------------------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"a smoke test of the bench: {SIZES['quick']}")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps of each run")
    parser.add_argument("--eval-every", type=int, default=None, help="checkpoint spacing (default: steps / 3)")
    parser.add_argument("--train", type=int, default=None, help="training utterances")
    parser.add_argument("--dev", type=int, default=None, help="validation utterances (the dev loss)")
    parser.add_argument("--test", type=int, default=None, help="test utterances (WER, test loss, first tokens)")
    parser.add_argument("--seconds-per-word", type=float, default=0.32, help="length of each word's tones")
    parser.add_argument("--encoder-layers", type=int, default=4, help="transformer layers of the tiny HuBERT")
    parser.add_argument("--layer", type=int, default=4, help="HuBERT layer (1-based) clustered and projected")
    parser.add_argument("--units", type=int, default=None, help="k-means units")
    parser.add_argument("--downsample", type=int, default=5, help="projector.downsample")
    parser.add_argument("--projector-hidden", type=int, default=64, help="projector.hidden")
    parser.add_argument("--batch", type=int, default=16, help="utterances per step, both methods")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate, both methods")
    parser.add_argument("--warmup", type=int, default=10, help="warmup steps of the cosine schedule")
    parser.add_argument("--seed", type=int, default=42, help="corpus, model-side RNG and sample order")
    parser.add_argument("--max-tokens", type=int, default=24, help="greedy tokens per test utterance")
    parser.add_argument("--threads", type=int, default=1, help="torch compute threads (a shared 2-core machine)")
    parser.add_argument("--out", type=Path, default=None, help="working folder, kept (default: a temporary one)")
    args = parser.parse_args()
    for key, value in SIZES["quick" if args.quick else "default"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.eval_every = args.eval_every or max(1, args.steps // 3)
    if args.out is not None and args.out.exists() and any(args.out.iterdir()):
        parser.error(f"--out {args.out} is not empty")
    return args


def main() -> None:
    args = parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    root = args.out or Path(tempfile.mkdtemp(prefix="bench-learning-"))
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        parts = build_parts(args, root)
        print(
            f"fixtures in {time.perf_counter() - t0:.0f} s: {args.train}/{args.dev}/{args.test} utterances, tiny "
            f"HuBERT layer {args.layer}, {args.units} units, tiny Llama extended with them"
        )
        runs = {}
        for method in METHODS:
            runs[method] = train(method, args, parts, root)
            print(f"trained {method}: {args.steps} steps x {args.batch} utterances in {runs[method].seconds:.0f} s")
        same = same_utterances(runs)
        points = [p for method in METHODS for p in evaluate(method, args, parts, runs[method], root)]
        print()
        print(
            f"trainable=full, lr {args.lr:g} (warmup {args.warmup}, cosine), seed {args.seed}, {args.batch} utterances "
            f"per step; units: k={args.units} on layer {args.layer}, 50 positions/s; features: layer {args.layer} "
            f"through a projector (downsample {args.downsample}, hidden {args.projector_hidden}), "
            f"{50 / args.downsample:g} positions/s"
        )
        print(same)
        print()
        print_table(points)
        print()
        print(verdict(points))
        print(f"wall time {time.perf_counter() - t0:.0f} s" + (f"; runs kept in {root}" if args.out else ""))
    finally:
        if args.out is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
