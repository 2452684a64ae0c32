"""The PyTorch generation backend: the torchtune model with a KV cache, left-padded batches, vLLM's sampling.

It needs nothing beyond training's own stack, and gives the same greedy tokens as vLLM (tested); it is
the fallback where vLLM cannot run and the reference the vLLM backend is checked against.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchtune.generation import get_causal_mask_from_padding_mask, get_position_ids_from_padding_mask
from torchtune.modules import TransformerDecoder, local_kv_cache
from tqdm import tqdm

from ssi.generate import GenerationError
from ssi.generate.sampling import Completion, SamplingOptions, completion
from ssi.model.engines import embedded_prompts, hidden_states


def _last_logits(
    model: TransformerDecoder,
    tokens: torch.Tensor,
    mask: torch.Tensor,
    pos: torch.Tensor,
    embeds: torch.Tensor | None = None,
) -> torch.Tensor:
    """Float logits of the last position only (`hidden_states` leaves the projection to us)."""
    return model.unembed(hidden_states(model, tokens, mask, pos, embeds)[:, -1])


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
    embeds: Sequence[torch.Tensor] | None = None,
) -> list[Completion]:
    """Left-padded prompts: positions restart at 0 on each row's first real token and padding is masked
    out of every attention row, so each row computes exactly what it would alone. `embeds` (one
    [prompt length, dim] tensor per prompt) replace the prompts' token embeddings; their audio slots
    (negative ids) are never looked up."""
    batch, width = len(prompts), max(len(p) for p in prompts)
    total = width + max(budgets)
    tokens = torch.full((batch, width), pad_id, dtype=torch.long, device=device)
    real = torch.zeros((batch, total), dtype=torch.bool, device=device)  # False on left padding
    seen = torch.zeros((batch, model.tok_embeddings.num_embeddings), dtype=torch.bool, device=device)
    for row, prompt in enumerate(prompts):
        ids = torch.tensor(prompt, device=device)
        ids = ids[ids >= 0] if embeds is not None else ids  # audio slots hold features, not tokens
        tokens[row, width - len(prompt) :] = torch.tensor([pad_id if t < 0 else t for t in prompt], device=device)
        real[row, width - len(prompt) :] = True
        seen[row, ids] = True  # the repetition penalty covers prompt tokens too, as in vLLM
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    outputs: list[list[int]] = [[] for _ in prompts]
    finished = [False] * batch
    columns = torch.arange(total, device=device)
    with local_kv_cache(model, batch_size=batch, device=device, dtype=dtype, decoder_max_seq_len=total):
        mask = get_causal_mask_from_padding_mask(real[:, :width], target_seq_len=total)
        prefill = None if embeds is None else embedded_prompts(model, tokens, embeds)
        logits = _last_logits(model, tokens, mask, get_position_ids_from_padding_mask(real[:, :width]), prefill)
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
    prompt_embeds: Sequence[torch.Tensor] | None = None,
) -> list[Completion]:
    """Generate with the torchtune model and a KV cache, `batch_size` prompts at a time (longest first,
    so similar lengths share a batch and an out-of-memory error shows up in the first batch);
    `prompt_embeds` replace the prompts' token embeddings (the features method)."""
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
                embeds=None if prompt_embeds is None else [prompt_embeds[i] for i in index],
            )
            for i, result in zip(index, done, strict=True):
                results[i] = result
            bar.update(len(index))
    return [r for r in results if r is not None]


def _generator(seed: int | None, index: int, device: torch.device) -> torch.Generator | None:
    return None if seed is None else torch.Generator(device).manual_seed(seed + index)
