"""`scripts/evaluate.py model=<checkpoint> benchmark=<items.jsonl>`: score a likelihood benchmark with one
checkpoint and write the results where the run layout says (docs/evaluation.md).

The checkpoint's run config says how its sequences were built (dedup, modality tokens, BOS/EOS), its
`ssi.json` which units exist. Output: `<run>/evaluations/epoch_E/global_step_S/<benchmark>/` (or
`<output_dir>/<benchmark>/`) with `scores.jsonl`, `summary.json` and, for ZeroSpeech items,
`zerospeech/<task>/<split>.txt`; written atomically, never over an existing result unless asked.
"""

from __future__ import annotations

import datetime
import gc
import logging
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ssi import loggers, report_error, run_dir, setup_cli_logging
from ssi.config import MissingSettingError, required, to_container
from ssi.data import DataValidationError
from ssi.eval.benchmark import (
    SCORES,
    ItemScore,
    format_summary,
    item_scores,
    scores_jsonl,
    summarize,
    zerospeech_files,
)
from ssi.eval.items import BenchmarkError, Item, check_units, read_items
from ssi.eval.likelihood import Pair, score_torch, score_vllm, tree_length
from ssi.eval.sequences import SequenceBuilder, resolve_settings
from ssi.files import atomic_output_dir, write_json
from ssi.hf_dir import METHOD_MANIFEST
from ssi.model.architecture import CheckpointError
from ssi.model.checkpointer import SpeechCheckpointer
from ssi.model.engines import EngineError, stop_vllm, torch_engine, vllm_engine
from ssi.versions import package_versions
from ssi.vocab.tiktoken import load_tokenizer

log = logging.getLogger(__name__)

BACKENDS = ("torch", "vllm")
EXIT_OUTPUT_EXISTS = 3  # "already done": read by the every-checkpoint command (scripts/evaluate_run.py)
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


class OutputExistsError(BenchmarkError, FileExistsError):
    """The output directory exists and overwrite=false: `main` exits with EXIT_OUTPUT_EXISTS."""


def benchmark_name(benchmark: Path, name: str | None) -> str:
    """The results folder: `name=` or the benchmark file's stem, made safe for a path."""
    cleaned = _UNSAFE_NAME.sub("_", name or benchmark.stem).strip("._")
    if not cleaned:
        raise BenchmarkError(f"cannot derive a folder name from {benchmark}: set name=")
    return cleaned


@dataclass(frozen=True)
class EvaluationTarget:
    """What `evaluate.py` would read and where it would write, decided from the configuration alone."""

    model_dir: Path
    benchmark: Path
    name: str
    location: run_dir.CheckpointLocation
    output_dir: Path


def evaluation_target(cfg: DictConfig) -> EvaluationTarget:
    """The model, benchmark and results directory of a configuration (the every-checkpoint command uses it
    to skip what exists without starting anything)."""
    try:
        model_dir = run_dir.model_or_final_checkpoint(required(cfg, "model", " (a checkpoint, run or model directory)"))
        benchmark = Path(required(cfg, "benchmark", " (a benchmark items .jsonl, docs/evaluation.md)"))
    except (MissingSettingError, run_dir.RunDirError) as err:
        raise BenchmarkError(str(err)) from None
    if not model_dir.is_dir():
        raise BenchmarkError(f"model={model_dir} is not a directory (give a checkpoint or extended model dir)")
    name = benchmark_name(benchmark, cfg.name)
    location = run_dir.locate_checkpoint(model_dir)
    if cfg.output_dir is not None:
        return EvaluationTarget(model_dir, benchmark, name, location, Path(cfg.output_dir) / name)
    if location.run_dir is None:
        raise BenchmarkError(
            f"{model_dir} is not a checkpoint inside a run directory (<run>/checkpoints/epoch_E/global_step_S): "
            "give output_dir=<dir> for its results"
        )
    assert location.epoch is not None and location.step is not None
    out_dir = run_dir.evaluations_dir(location.run_dir, location.epoch, location.step, name)
    return EvaluationTarget(model_dir, benchmark, name, location, out_dir)


def _score_torch(
    cfg: DictConfig, checkpointer: SpeechCheckpointer, pairs: list[Pair], pad_id: int, max_model_len: int
) -> tuple[list, dict[str, Any]]:
    batch_size = int(cfg.torch.batch_size)
    if batch_size < 1:
        raise BenchmarkError(f"torch.batch_size must be >= 1, got {batch_size}")
    model, device, _, settings = torch_engine(checkpointer, to_container(cfg.torch), max_model_len)
    totals = score_torch(model, pairs, batch_size=batch_size, pad_id=pad_id, device=device, progress=bool(cfg.progress))
    return totals, settings


def _score_vllm(
    cfg: DictConfig, checkpointer: SpeechCheckpointer, pairs: list[Pair], max_model_len: int
) -> tuple[list, dict[str, Any]]:
    # the prompt plus the one token every request generates
    llm, settings = vllm_engine(checkpointer, to_container(cfg.vllm), max_model_len + 1)
    try:
        return score_vllm(llm, pairs, progress=bool(cfg.progress)), settings
    finally:
        stop_vllm(llm)
        del llm
        gc.collect()


def run_evaluation(cfg: DictConfig) -> dict[str, Any]:
    """Score one benchmark file with one model, write the outputs atomically; returns summary.json's contents."""
    target = evaluation_target(cfg)
    model_dir, benchmark, name = target.model_dir, target.benchmark, target.name
    location, out_dir = target.location, target.output_dir
    backend, score = str(cfg.backend), str(cfg.score)
    if backend not in BACKENDS:
        raise BenchmarkError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if score not in SCORES:
        raise BenchmarkError(f"score must be one of {SCORES}, got {score!r}")
    overwrite = bool(cfg.overwrite)
    if out_dir.exists() and not overwrite:  # before any work
        raise OutputExistsError(f"{out_dir} already exists; pass overwrite=true to replace it")
    if (model_dir / METHOD_MANIFEST).is_file():
        raise BenchmarkError(
            f"benchmark {name}: it compares the likelihoods of candidates spoken as units, but {model_dir} is a "
            f"method=features checkpoint ({METHOD_MANIFEST}): it reads audio through its projector and has no "
            "speech tokens to score; evaluate it by ASR (scripts/generate.py, scripts/evaluate_run.py)"
        )
    try:
        checkpointer = SpeechCheckpointer(model_dir, progress=bool(cfg.progress))
    except CheckpointError as err:
        raise BenchmarkError(str(err)) from None
    items = read_items(benchmark)
    check_units(items, checkpointer.vocab.n_dsus, str(benchmark))
    settings = resolve_settings(to_container(cfg.sequence), location.run_config, checkpointer.vocab.modality_tokens)
    tokenizer = load_tokenizer(model_dir, checkpointer.vocab)
    builder = SequenceBuilder(tokenizer, settings)
    pairs = [builder.pair(item) for item in items]
    max_model_len = _context_length(cfg, items, pairs, checkpointer, benchmark)
    log.info("%s: %d items, %s; writing %s", backend, len(items), settings.source, out_dir)
    t0 = time.perf_counter()
    if backend == "torch":
        totals, backend_settings = _score_torch(cfg, checkpointer, pairs, tokenizer.pad_id, max_model_len)
    else:
        totals, backend_settings = _score_vllm(cfg, checkpointer, pairs, max_model_len)
    elapsed = time.perf_counter() - t0
    scores = item_scores(items, totals, score)
    computed = (
        sum(tree_length(p) for p in pairs) if backend == "torch" else sum(len(s.tokens) for p in pairs for s in p)
    )
    summary = {
        **summarize(scores),
        "benchmark": str(benchmark.resolve()),
        "name": name,
        "score": score,
        "backend": backend,
        "backend_settings": backend_settings,
        "sequence": settings.record(),
        "model": str(model_dir.resolve()),
        "run_dir": str(location.run_dir) if location.run_dir else None,
        "epoch": location.epoch,
        "global_step": location.step,
        "n_scored_tokens": sum(s.n_positive_tokens + s.n_negative_tokens for s in scores),
        "n_computed_tokens": computed,
        "seconds": round(elapsed, 3),
        "items_per_second": round(len(items) / elapsed, 3),
        "versions": package_versions(),
        "command": sys.argv,
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    _write_results(out_dir, scores, summary, overwrite)
    print(format_summary(name, summary, score))
    print(
        f"{backend}: {len(items)} items in {elapsed:.2f} s ({len(items) / elapsed:.1f} items/s, "
        f"{computed / elapsed:.0f} tokens/s computed); wrote {out_dir}"
    )
    if cfg.log_metrics and cfg.output_dir is None and location.run_dir is not None and location.step is not None:
        metrics = {f"eval/{name}/accuracy": summary["accuracy"]}
        metrics |= {f"eval/{name}/{_UNSAFE_NAME.sub('_', c)}": v["accuracy"] for c, v in summary["categories"].items()}
        loggers.log_evaluation(location.run_dir, location.step, metrics)
    return summary


def _context_length(
    cfg: DictConfig, items: list[Item], pairs: list[Pair], checkpointer: SpeechCheckpointer, benchmark: Path
) -> int:
    """The context to allocate (`max_model_len`): the longest sequence, refused beyond the model's positions."""
    longest_item, longest = max(
        ((item, max(len(s.tokens) for s in pair)) for item, pair in zip(items, pairs, strict=True)), key=lambda x: x[1]
    )
    limit = checkpointer.architecture.max_position_embeddings
    if longest >= limit:
        raise BenchmarkError(
            f"{benchmark}: item {longest_item.id!r} has {longest} tokens, more than the model's context "
            f"(max_position_embeddings {limit})"
        )
    max_model_len = int(cfg.max_model_len or longest)
    if max_model_len < longest:
        raise BenchmarkError(
            f"max_model_len={max_model_len} is shorter than item {longest_item.id!r} ({longest} tokens)"
        )
    return max_model_len


def _write_results(out_dir: Path, scores: list[ItemScore], summary: dict[str, Any], overwrite: bool) -> None:
    submission = zerospeech_files(scores)
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        (tmp / run_dir.SCORES_FILE).write_text(scores_jsonl(scores), encoding="utf-8")
        write_json(tmp / run_dir.SUMMARY_FILE, summary)
        for relative, text in submission.items():
            path = tmp / run_dir.ZEROSPEECH_DIR / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")


def main(cfg: DictConfig) -> int:
    """scripts/evaluate.py's body: input errors are one line on stderr and exit code 2 (3 when the output
    directory already exists)."""
    setup_cli_logging()
    try:
        run_evaluation(cfg)
    except OutputExistsError as err:
        return report_error(err, EXIT_OUTPUT_EXISTS)
    except (BenchmarkError, EngineError, CheckpointError, DataValidationError, FileExistsError) as err:
        return report_error(err)
    return 0
