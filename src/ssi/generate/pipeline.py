"""`scripts/generate.py model=<checkpoint>`: transcribe one split, write it where the run layout says,
score it.

The checkpoint is enough: its run's config supplies the data preset (`ssi.generate.prompts`), its
`ssi.json` the vocabulary. Output goes to `<run>/generations/epoch_E/global_step_S/<dataset>/<split>/`
(docs/run_directory.md) through an atomic directory: `generations.jsonl` (one object per prompt, in
split order) and `generation_config.yaml` (every resolved setting); then `ssi.eval.scoring` writes
`wer.json` beside them.
"""

from __future__ import annotations

import datetime
import gc
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from ssi import devices, loggers, report_error, run_dir, setup_cli_logging
from ssi.config import MissingSettingError, required, to_container
from ssi.data import DataValidationError
from ssi.data.config import section_source
from ssi.eval.pipeline import EXIT_OUTPUT_EXISTS  # read by scripts/evaluate_run.py as "already done"
from ssi.eval.scoring import format_summary, score_generations
from ssi.eval.wer import WerInputError
from ssi.files import atomic_output_dir
from ssi.generate import GenerationError
from ssi.generate.beam import BeamOptions, beam_search_torch, beam_search_vllm, best_completions
from ssi.generate.prompts import Prompt, build_prompts, dataset_name_from_source, resolve_data_config, resolve_split
from ssi.generate.sampling import FINISH_LENGTH, FINISH_STOP, Completion, SamplingOptions
from ssi.generate.torch_backend import generate_torch
from ssi.generate.vllm_backend import generate_vllm
from ssi.hf_dir import INPUT_EMBEDDING, read_tensor
from ssi.model import methods
from ssi.model.architecture import CheckpointError
from ssi.model.checkpointer import SpeechCheckpointer
from ssi.model.engines import EngineError, stop_vllm, torch_engine, vllm_engine
from ssi.versions import package_versions
from ssi.vocab.tiktoken import SpeechLlama3Tokenizer, model_tokenizer

log = logging.getLogger(__name__)

BACKENDS = ("vllm", "torch")


class OutputExistsError(GenerationError, FileExistsError):
    """The output directory exists and overwrite=false: `main` exits with EXIT_OUTPUT_EXISTS, which
    scripts/evaluate_run.py reads as "already done"."""


def _run_vllm(
    cfg: DictConfig,
    checkpointer: SpeechCheckpointer,
    prompts: list[list[int]],
    stop_ids: list[int],
    sampling: SamplingOptions,
    beam: BeamOptions,
    max_model_len: int,
    embeds: list[Any] | None,
) -> tuple[list[Completion], dict[str, Any], float]:
    settings = to_container(cfg.vllm)
    engine_kwargs = beam.engine_kwargs(settings["engine_kwargs"])
    if embeds is not None:
        engine_kwargs["enable_prompt_embeds"] = True
    llm, settings = vllm_engine(checkpointer, settings, max_model_len, seed=sampling.seed, engine_kwargs=engine_kwargs)
    progress = bool(cfg.progress)
    try:
        t0 = time.perf_counter()
        if beam.enabled:
            found = beam_search_vllm(
                llm,
                prompts,
                options=beam,
                stop_ids=stop_ids,
                max_tokens=sampling.max_tokens,
                max_model_len=max_model_len,
                progress=progress,
                prompt_embeds=embeds,
                embedding_table=None if embeds is None else read_tensor(checkpointer.checkpoint_dir, INPUT_EMBEDDING),
            )
            completions = best_completions(found, prompts, stop_ids)
        else:
            completions = generate_vllm(
                llm,
                prompts,
                stop_ids=stop_ids,
                sampling=sampling,
                max_model_len=max_model_len,
                progress=progress,
                prompt_embeds=embeds,
            )
        return completions, settings, time.perf_counter() - t0
    finally:
        stop_vllm(llm)
        del llm
        gc.collect()


def _run_torch(
    cfg: DictConfig,
    checkpointer: SpeechCheckpointer,
    prompts: list[list[int]],
    stop_ids: list[int],
    pad_id: int,
    sampling: SamplingOptions,
    beam: BeamOptions,
    max_model_len: int,
    embeds: list[Any] | None,
) -> tuple[list[Completion], dict[str, Any], float]:
    model, device, dtype, settings = torch_engine(checkpointer, to_container(cfg.torch), max_model_len)
    common = {
        "stop_ids": stop_ids,
        "pad_id": pad_id,
        "max_model_len": max_model_len,
        "batch_size": int(settings["batch_size"]),
        "device": device,
        "dtype": dtype,
        "progress": bool(cfg.progress),
    }
    t0 = time.perf_counter()
    if beam.enabled:
        found = beam_search_torch(
            model, prompts, options=beam, max_tokens=sampling.max_tokens, prompt_embeds=embeds, **common
        )
        completions = best_completions(found, prompts, stop_ids)
    else:
        completions = generate_torch(model, prompts, sampling=sampling, prompt_embeds=embeds, **common)
    return completions, settings, time.perf_counter() - t0


def _feature_device(cfg: DictConfig) -> torch.device:
    """Where the features method's encoder and projector build prompt embeddings: the torch backend's device,
    or the GPU when vLLM generates on one."""
    if str(cfg.backend) == "torch":
        return devices.resolve_device(str(cfg.torch.device))
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _jsonl(prompts: Sequence[Prompt], completions: Sequence[Completion], tokenizer: SpeechLlama3Tokenizer) -> str:
    """generations.jsonl: one object per prompt, fields as docs/run_directory.md lists them."""
    lines = []
    for prompt, done in zip(prompts, completions, strict=True):
        row = {
            "id": prompt.id,
            "reference": prompt.reference,
            "text": tokenizer.decode(done.token_ids, skip_special_tokens=True).strip(),
            "finish_reason": done.finish_reason,
            "stop_token_id": done.stop_token_id,
            "n_prompt_tokens": len(prompt.token_ids),
            "n_output_tokens": len(done.token_ids),
            "prompt_token_ids": prompt.token_ids,
            "output_token_ids": done.token_ids,
        }
        lines.append(json.dumps(row, ensure_ascii=False))
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class GenerationTarget:
    """What `generate.py` would read and where it would write, decided from the configuration alone."""

    model_dir: Path
    location: run_dir.CheckpointLocation
    data: DictConfig
    data_source: str
    section: str
    split: str
    dataset_name: str
    output_dir: Path


def generation_target(cfg: DictConfig) -> GenerationTarget:
    """The data preset, split and output directory of a configuration (the every-checkpoint command uses
    it to skip what exists without starting anything)."""
    try:
        model_dir = run_dir.model_or_final_checkpoint(required(cfg, "model", " (a checkpoint, run or model directory)"))
    except (MissingSettingError, run_dir.RunDirError) as err:
        raise GenerationError(str(err)) from None
    if not model_dir.is_dir():
        raise GenerationError(f"model={model_dir} is not a directory (give a checkpoint or extended model dir)")
    location = run_dir.locate_checkpoint(model_dir)
    data, data_source = resolve_data_config(cfg, location, model_dir)
    section, split_name = resolve_split(data, str(cfg.gen.split))
    try:
        source = section_source(data, section).spec.source
    except DataValidationError as err:
        raise GenerationError(str(err)) from None
    dataset_name = str(cfg.gen.dataset_name or dataset_name_from_source(source))
    if cfg.gen.output_dir is not None:
        out_dir = Path(cfg.gen.output_dir)
    elif location.run_dir is not None:
        assert location.epoch is not None and location.step is not None
        out_dir = run_dir.generations_dir(location.run_dir, location.epoch, location.step, dataset_name, split_name)
    else:  # resolve_data_config let it through because data= was given
        raise GenerationError(
            f"{model_dir} is not a checkpoint inside a run directory: give gen.output_dir=<dir> for its generations"
        )
    return GenerationTarget(model_dir, location, data, data_source, section, split_name, dataset_name, out_dir)


def run_generation(cfg: DictConfig) -> dict[str, Any]:
    """Generate one split with one checkpoint, write the outputs atomically and (unless `score=false`)
    score them. Returns the contents of generation_config.yaml, plus `wer` when scored."""
    target = generation_target(cfg)
    model_dir, location, data, data_source = target.model_dir, target.location, target.data, target.data_source
    section, split_name, dataset_name, out_dir = target.section, target.split, target.dataset_name, target.output_dir
    backend = str(cfg.backend)
    if backend not in BACKENDS:
        raise GenerationError(f"backend must be one of {BACKENDS}, got {backend!r}")
    progress = bool(cfg.progress)
    sampling = SamplingOptions.from_config(to_container(cfg.sampling_params))
    beam = BeamOptions.from_config(to_container(cfg.beam_search))
    beam.check_sampling(sampling)
    overwrite = bool(cfg.overwrite)
    if out_dir.exists() and not overwrite:  # before any work: generating first and failing then wastes hours
        if cfg.score and unscored(out_dir):
            return _score_in_place(cfg, target)
        raise OutputExistsError(f"{out_dir} already exists; pass overwrite=true to replace it")
    try:
        method = methods.from_checkpoint(model_dir)
        checkpointer = SpeechCheckpointer(model_dir, progress=progress, extended=methods.needs_extension(method.name))
    except (CheckpointError, methods.MethodError) as err:
        raise GenerationError(str(err)) from None
    tokenizer = model_tokenizer(model_dir, checkpointer.vocab)
    prompts = build_prompts(data, section, split_name, tokenizer, progress, method.audio_slots)
    longest = max(len(p.token_ids) for p in prompts)
    position_limit = checkpointer.architecture.max_position_embeddings
    max_model_len = int(cfg.gen.max_model_len or min(position_limit, longest + sampling.max_tokens))
    if longest >= max_model_len:
        worst = max(prompts, key=lambda p: len(p.token_ids))
        raise GenerationError(
            f"sample {worst.id!r}: the prompt has {longest} tokens, no room left under max_model_len={max_model_len} "
            f"(the model's max_position_embeddings is {position_limit})"
        )
    stop_ids = list(tokenizer.stop_tokens)
    token_lists = [p.token_ids for p in prompts]
    log.info(
        "%s: %d prompts from %s[%s] (%s section), %d-%d tokens; writing %s",
        backend,
        len(prompts),
        data[section].dataset.source,
        split_name,
        section,
        min(len(t) for t in token_lists),
        longest,
        out_dir,
    )
    t0 = time.perf_counter()
    embeds = method.prompt_embeddings(token_lists, [p.audio for p in prompts], model_dir, _feature_device(cfg))
    feature_seconds = time.perf_counter() - t0
    if backend == "vllm":
        completions, backend_settings, elapsed = _run_vllm(
            cfg, checkpointer, token_lists, stop_ids, sampling, beam, max_model_len, embeds
        )
    else:
        completions, backend_settings, elapsed = _run_torch(
            cfg, checkpointer, token_lists, stop_ids, tokenizer.pad_id, sampling, beam, max_model_len, embeds
        )
    n_tokens = sum(len(c.token_ids) for c in completions)
    record: dict[str, Any] = {
        "model": str(model_dir.resolve()),
        "run_dir": str(location.run_dir) if location.run_dir else None,
        "epoch": location.epoch,
        "global_step": location.step,
        "backend": backend,
        "backend_settings": backend_settings,
        **method.record(),
        "decoding": "beam_search" if beam.enabled else "sampling",
        "sampling_params": asdict(sampling),
        "beam_search": beam.record() if beam.enabled else None,
        "stop_token_ids": stop_ids,
        "max_model_len": max_model_len,
        "scoring": {"enabled": bool(cfg.score), **to_container(cfg.wer)},
        "dataset_name": dataset_name,
        "split": split_name,
        "data_section": section,
        "data_source": data_source,
        "data": to_container(data),
        "output_dir": str(out_dir.resolve()),
        "n_prompts": len(prompts),
        "n_generated_tokens": n_tokens,
        "finish_reasons": {r: sum(c.finish_reason == r for c in completions) for r in (FINISH_STOP, FINISH_LENGTH)},
        "generation_seconds": round(elapsed, 3),
        "prompt_embedding_seconds": round(feature_seconds, 3) if embeds is not None else None,
        "prompts_per_second": round(len(prompts) / elapsed, 3),
        "generated_tokens_per_second": round(n_tokens / elapsed, 3),
        "versions": package_versions(),
        "command": sys.argv,
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    summary = None
    # Everything, the score included, is written before the folder is renamed into place: a folder in place is
    # a finished task (evaluate_run skips it), whenever the process is killed.
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        (tmp / run_dir.GENERATIONS_FILE).write_text(_jsonl(prompts, completions, tokenizer), encoding="utf-8")
        (tmp / run_dir.GENERATION_CONFIG_FILE).write_text(OmegaConf.to_yaml(OmegaConf.create(record)), encoding="utf-8")
        if cfg.score:
            summary = _score(cfg, target, tmp / run_dir.GENERATIONS_FILE)
    print(
        f"{backend}: {len(prompts)} prompts, {n_tokens} generated tokens in {elapsed:.2f} s: "
        f"{len(prompts) / elapsed:.2f} prompts/s, {n_tokens / elapsed:.1f} generated tokens/s "
        f"({record['finish_reasons'][FINISH_LENGTH]} hit the length limit); wrote {out_dir / run_dir.GENERATIONS_FILE}"
    )
    if summary is not None:
        _report_score(cfg, target, summary, beam.width if beam.enabled else None)
        record["wer"] = summary["wer"]
    return record


def unscored(out_dir: Path) -> bool:
    """A generations folder without its score: left by a version that scored after the rename (killed in
    between), or generated with score=false."""
    return (out_dir / run_dir.GENERATIONS_FILE).is_file() and not (out_dir / run_dir.WER_FILE).exists()


def _score(cfg: DictConfig, target: GenerationTarget, generations: Path) -> dict[str, Any]:
    return score_generations(
        generations,
        dataset=target.dataset_name,
        split=target.split,
        normalizer=str(cfg.wer.normalizer),
        per_utterance=bool(cfg.wer.per_utterance),
        progress=bool(cfg.progress),
        final_path=target.output_dir / run_dir.GENERATIONS_FILE,
    )


def _report_score(cfg: DictConfig, target: GenerationTarget, summary: dict[str, Any], beam: int | None) -> None:
    print(format_summary(summary))
    location = target.location
    if cfg.log_metrics and cfg.gen.output_dir is None and location.run_dir is not None:
        metric = f"wer/{target.dataset_name}/{target.split}" + (f"/beam{beam}" if beam is not None else "")
        loggers.log_evaluation(location.run_dir, location.step, {metric: summary["wer"]})


def _score_in_place(cfg: DictConfig, target: GenerationTarget) -> dict[str, Any]:
    """Finish a folder that has its generations but no wer.json: score them, as the interrupted run would have."""
    log.info("%s has generations but no %s: scoring them", target.output_dir, run_dir.WER_FILE)
    record = OmegaConf.to_container(OmegaConf.load(target.output_dir / run_dir.GENERATION_CONFIG_FILE))
    assert isinstance(record, dict)
    summary = _score(cfg, target, target.output_dir / run_dir.GENERATIONS_FILE)
    beam = record.get("beam_search") or None
    _report_score(cfg, target, summary, int(beam["width"]) if beam else None)
    return {**record, "wer": summary["wer"]}


def main(cfg: DictConfig) -> int:
    """scripts/generate.py's body: configuration and input errors are one line on stderr and exit code 2
    (3 when the output directory already exists)."""
    setup_cli_logging()
    try:
        run_generation(cfg)
    except OutputExistsError as err:
        return report_error(err, EXIT_OUTPUT_EXISTS)
    except (GenerationError, EngineError, CheckpointError, DataValidationError, WerInputError, FileExistsError) as err:
        return report_error(err)
    return 0
