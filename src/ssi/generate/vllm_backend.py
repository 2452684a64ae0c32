"""The vLLM generation backend: an engine on the HF checkpoint (`ssi.model.engines.start_vllm`), fed token
ids, decoded by us (DSU-aware).

vLLM schedules and batches every prompt itself; the engine runs without a tokenizer because prompts are
token ids built by the training data pipeline and outputs are decoded by the speech vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ssi.generate.sampling import Completion, SamplingOptions, completion


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


def generate_vllm(
    llm: Any,
    prompts: Sequence[list[int]],
    *,
    stop_ids: Sequence[int],
    sampling: SamplingOptions,
    max_model_len: int,
    progress: bool = True,
    prompt_embeds: Sequence[Any] | None = None,
) -> list[Completion]:
    """Hand every prompt to the engine at once: it schedules and batches them itself. With `prompt_embeds`
    (one [prompt length, dim] tensor per prompt: the features method) the engine, started with
    `enable_prompt_embeds`, reads them instead of the token ids."""
    from vllm.inputs import EmbedsPrompt, TokensPrompt

    params = [
        vllm_sampling_params(sampling, min(sampling.max_tokens, max_model_len - len(p)), stop_ids, i)
        for i, p in enumerate(prompts)
    ]
    if prompt_embeds is None:
        inputs: list[Any] = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    else:
        inputs = [EmbedsPrompt(prompt_embeds=e) for e in prompt_embeds]
    outputs = llm.generate(inputs, params, use_tqdm=progress)
    return [completion(out.outputs[0].token_ids, stop_ids) for out in outputs]
