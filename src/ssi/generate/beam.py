"""Beam search with vLLM's algorithm (0.32 `LLM.beam_search`) and our stop ids, in both backends.

vLLM's own `LLM.beam_search` knows a single end-of-sequence id (the tokenizer's `eos_token_id`, here
`<|end_of_text|>`), while ASR answers end with `<|eot_id|>` and generation stops on three ids; it also
needs an engine with a tokenizer. So both backends run the same algorithm here, with the stop ids as
end of sequence (docs/evaluation.md, "Beam search"):

1. every live beam proposes its `2 * width` most likely next tokens (raw log-softmax, no temperature),
   in rank order; each candidate scores `cum_logprob + logprob`;
2. candidates ending in a stop id join `completed` (all of them); the others are sorted by score
   (stable: ties keep beam order, then rank order) and the best `width` stay live;
3. this runs for exactly `max_tokens` steps (fewer only if no beam is left alive); then completed and
   live beams are sorted by score and the best is the output.

The score is `cum_logprob / L ** length_penalty` with `L` = prompt + generated tokens, minus one when the
last token is a stop id: vLLM's definition, where the prompt counts in the length. Tested against
`LLM.beam_search` when the stop ids are just its EOS.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torchtune.generation import get_causal_mask_from_padding_mask, get_position_ids_from_padding_mask
from torchtune.modules import TransformerDecoder, local_kv_cache
from tqdm import tqdm

from ssi.generate import GenerationError
from ssi.generate.sampling import Completion, SamplingOptions, completion
from ssi.model.engines import embedded_prompts, hidden_states

# vLLM's default `max_logprobs`: a step asks for 2 * width logprobs, so wider beams raise the engine's limit.
VLLM_DEFAULT_MAX_LOGPROBS = 20


@dataclass(frozen=True)
class BeamOptions:
    """The `beam_search` section of conf/generate.yaml; `width` 1 turns beam search off."""

    width: int = 1
    length_penalty: float = 1.0

    def __post_init__(self) -> None:
        if self.width < 1:
            raise GenerationError(f"beam_search.width must be >= 1 (1 = off), got {self.width}")

    @property
    def enabled(self) -> bool:
        return self.width > 1

    @property
    def candidates_per_beam(self) -> int:
        return 2 * self.width

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> BeamOptions:
        unknown = sorted(set(cfg) - {"width", "length_penalty"})
        if unknown:
            raise GenerationError(
                f"beam_search: unsupported key(s) {', '.join(unknown)}; supported: width, length_penalty"
            )
        try:
            return cls(width=int(cfg.get("width", 1)), length_penalty=float(cfg.get("length_penalty", 1.0)))
        except (TypeError, ValueError) as err:
            raise GenerationError(f"beam_search: {err}") from None

    def check_sampling(self, sampling: SamplingOptions) -> None:
        """Beam search ranks raw log-probabilities: a sampling setting it would ignore is refused, not dropped."""
        ignored = {
            "temperature": sampling.temperature != 0.0,
            "top_p": sampling.top_p != 1.0,
            "top_k": sampling.top_k not in (0, -1),
            "repetition_penalty": sampling.repetition_penalty != 1.0,
        }
        named = [f"sampling_params.{k}={getattr(sampling, k)}" for k, on in ignored.items() if on]
        if self.enabled and named:
            raise GenerationError(
                f"beam_search.width={self.width} ranks raw log-probabilities and would ignore {', '.join(named)}: "
                "reset them (temperature=0, top_p=1, top_k=0, repetition_penalty=1) or use beam_search.width=1"
            )

    def engine_kwargs(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """vLLM engine arguments that allow this search: each step asks for `2 * width` logprobs, more than
        vLLM's default `max_logprobs` for widths above 10."""
        kwargs = dict(given)
        if self.enabled and self.candidates_per_beam > kwargs.get("max_logprobs", VLLM_DEFAULT_MAX_LOGPROBS):
            kwargs["max_logprobs"] = self.candidates_per_beam
        return kwargs

    def record(self) -> dict[str, Any]:
        """What generation_config.yaml says about the decoding."""
        return {
            "width": self.width,
            "length_penalty": self.length_penalty,
            "candidates_per_beam": self.candidates_per_beam,
            "algorithm": "vLLM 0.32 LLM.beam_search, with every stop id as end of sequence",
            "score": "cum_logprob / (prompt + output tokens, without a final stop token) ** length_penalty",
        }


def beam_score(tokens: Sequence[int], cum_logprob: float, stop_ids: frozenset[int], length_penalty: float) -> float:
    """vLLM's `get_beam_search_score` with a set of stop ids instead of one EOS."""
    length = len(tokens) - (1 if tokens[-1] in stop_ids else 0)
    return cum_logprob / (max(length, 1) ** length_penalty)


@dataclass
class Beam:
    tokens: list[int]  # prompt + generated
    cum_logprob: float = 0.0
    parent: int = 0  # which live beam of the previous step it extends (the torch backend moves its KV cache)


@dataclass
class BeamInstance:
    """The search for one prompt: live beams (best first) and every beam that ended on a stop id."""

    prompt_len: int
    budget: int  # steps this prompt may take: max_tokens, or less where max_model_len is reached first
    beams: list[Beam] = field(default_factory=list)
    completed: list[Beam] = field(default_factory=list)

    def active(self, step: int) -> bool:
        return step < self.budget and bool(self.beams)

    def advance(
        self, candidates: Sequence[Sequence[tuple[int, float]]], options: BeamOptions, stop_ids: frozenset[int]
    ) -> None:
        """One step: `candidates[i]` are live beam i's proposals (token, logprob) in rank order."""
        grown: list[Beam] = []
        for parent, (beam, proposals) in enumerate(zip(self.beams, candidates, strict=True)):
            for token, logprob in proposals:
                child = Beam([*beam.tokens, token], beam.cum_logprob + logprob, parent)
                (self.completed if token in stop_ids else grown).append(child)
        grown.sort(key=lambda b: beam_score(b.tokens, b.cum_logprob, stop_ids, options.length_penalty), reverse=True)
        self.beams = grown[: options.width]

    def best(self, options: BeamOptions, stop_ids: frozenset[int]) -> list[Beam]:
        """Completed and live beams, best first, at most `width` of them (what `LLM.beam_search` returns)."""
        ranked = sorted(
            [*self.completed, *self.beams],
            key=lambda b: beam_score(b.tokens, b.cum_logprob, stop_ids, options.length_penalty),
            reverse=True,
        )
        return ranked[: options.width]


def best_completions(
    found: Sequence[Sequence[Beam]], prompts: Sequence[list[int]], stop_ids: Sequence[int]
) -> list[Completion]:
    """The output of each prompt: its best beam's generated tokens."""
    return [completion(beams[0].tokens[len(p) :], stop_ids) for beams, p in zip(found, prompts, strict=True)]


def _instances(prompts: Sequence[list[int]], max_tokens: int, max_model_len: int) -> list[BeamInstance]:
    for index, prompt in enumerate(prompts):
        if len(prompt) >= max_model_len:
            raise GenerationError(
                f"prompt {index} has {len(prompt)} tokens: no room left under max_model_len={max_model_len}"
            )
    return [BeamInstance(len(p), min(max_tokens, max_model_len - len(p)), beams=[Beam(list(p))]) for p in prompts]


def beam_search_vllm(
    llm: Any,
    prompts: Sequence[list[int]],
    *,
    options: BeamOptions,
    stop_ids: Sequence[int],
    max_tokens: int,
    max_model_len: int,
    progress: bool = True,
    prompt_embeds: Sequence[torch.Tensor] | None = None,
    embedding_table: torch.Tensor | None = None,
) -> list[list[Beam]]:
    """The best beams of every prompt (best first), one vLLM `generate` call per step over all live beams of
    all prompts, each asking for one token with its `2 * width` logprobs (as `LLM.beam_search` does; those
    requests read the prefix cache, so a beam's prompt is not recomputed). With `prompt_embeds` (the features
    method) a beam is its prompt's embeddings followed by the `embedding_table` rows of what it generated."""
    from vllm import SamplingParams
    from vllm.inputs import EmbedsPrompt, TokensPrompt

    def request(index: int, beam: Beam) -> Any:
        if prompt_embeds is None:
            return TokensPrompt(prompt_token_ids=beam.tokens)
        assert embedding_table is not None, "prompt embeddings need the embedding table for generated tokens"
        generated = embedding_table[beam.tokens[len(prompts[index]) :]].to(prompt_embeds[index].dtype)
        return EmbedsPrompt(prompt_embeds=torch.cat([prompt_embeds[index], generated]))

    params = SamplingParams(
        max_tokens=1, temperature=0.0, logprobs=options.candidates_per_beam, detokenize=False, ignore_eos=True
    )
    stops = frozenset(int(t) for t in stop_ids)
    instances = _instances(prompts, max_tokens, max_model_len)
    steps = max((i.budget for i in instances), default=0)
    for step in tqdm(range(steps), desc=f"beam search (vllm, width {options.width})", disable=not progress):
        live = [(n, i) for n, i in enumerate(instances) if i.active(step)]
        if not live:
            break
        requests = [request(n, b) for n, i in live for b in i.beams]
        outputs = iter(llm.generate(requests, params, use_tqdm=False))
        for _, instance in live:
            proposals = []
            for _ in instance.beams:
                ranked = next(outputs).outputs[0].logprobs[0]
                proposals.append([(int(t), float(lp.logprob)) for t, lp in ranked.items()])
            instance.advance(proposals, options, stops)
    return [i.best(options, stops) for i in instances]


def beam_search_torch(
    model: TransformerDecoder,
    prompts: Sequence[list[int]],
    *,
    options: BeamOptions,
    stop_ids: Sequence[int],
    pad_id: int,
    max_tokens: int,
    max_model_len: int,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
    progress: bool = True,
    prompt_embeds: Sequence[torch.Tensor] | None = None,
) -> list[list[Beam]]:
    """The best beams of every prompt (best first), `batch_size` prompts at a time with `width` KV-cache rows
    each; after every step each row takes over its parent beam's cache. `prompt_embeds` replace the prompts'
    token embeddings (the features method)."""
    if batch_size < 1:
        raise GenerationError(f"torch.batch_size must be >= 1, got {batch_size}")
    stops = frozenset(int(t) for t in stop_ids)
    results: list[list[Beam]] = []
    model.eval()
    with torch.inference_mode(), tqdm(total=len(prompts), desc="beam search (torch)", disable=not progress) as bar:
        for start in range(0, len(prompts), batch_size):
            chunk = _instances(prompts[start : start + batch_size], max_tokens, max_model_len)
            embeds = None if prompt_embeds is None else prompt_embeds[start : start + batch_size]
            _search_chunk(model, chunk, options, stops, pad_id, device, dtype, embeds)
            results.extend(i.best(options, stops) for i in chunk)
            bar.update(len(chunk))
    return results


def _search_chunk(
    model: TransformerDecoder,
    instances: list[BeamInstance],
    options: BeamOptions,
    stops: frozenset[int],
    pad_id: int,
    device: torch.device,
    dtype: torch.dtype,
    embeds: Sequence[torch.Tensor] | None = None,
) -> None:
    """Rows b * width .. b * width + width - 1 hold prompt b's beams (left-padded, as in `torch_backend`);
    rows without a live beam copy a live row and their outputs are ignored."""
    width = options.width
    n_rows, longest = len(instances) * width, max(i.prompt_len for i in instances)
    steps = max(i.budget for i in instances)
    total = longest + steps
    tokens = torch.full((n_rows, longest), pad_id, dtype=torch.long, device=device)
    real = torch.zeros((n_rows, total), dtype=torch.bool, device=device)
    for b, instance in enumerate(instances):
        rows = slice(b * width, (b + 1) * width)
        prompt = [pad_id if t < 0 else t for t in instance.beams[0].tokens]  # audio slots: never looked up
        tokens[rows, longest - instance.prompt_len :] = torch.tensor(prompt, device=device)
        real[rows, longest - instance.prompt_len :] = True
    lengths = torch.tensor([i.prompt_len for i in instances for _ in range(width)], device=device)
    columns = torch.arange(total, device=device)
    k = options.candidates_per_beam
    with local_kv_cache(model, batch_size=n_rows, device=device, dtype=dtype, decoder_max_seq_len=total):
        mask = get_causal_mask_from_padding_mask(real[:, :longest], target_seq_len=total)
        prefill = None if embeds is None else embedded_prompts(model, tokens, embeds, width)
        h = hidden_states(model, tokens, mask, get_position_ids_from_padding_mask(real[:, :longest]), prefill)
        top = torch.log_softmax(model.unembed(h[:, -1]).float(), dim=-1).topk(k, dim=-1)
        for step in range(steps):
            values, ids = top.values.tolist(), top.indices.tolist()
            parents = list(range(n_rows))
            chosen = [pad_id] * n_rows
            for b, instance in enumerate(instances):
                if not instance.active(step):
                    continue
                base = b * width
                rows = range(base, base + len(instance.beams))
                instance.advance([list(zip(ids[r], values[r], strict=True)) for r in rows], options, stops)
                for slot, beam in enumerate(instance.beams):
                    parents[base + slot], chosen[base + slot] = base + beam.parent, beam.tokens[-1]
                for slot in range(len(instance.beams), width):
                    parents[base + slot] = base
            if not any(i.active(step + 1) for i in instances):
                break
            index = torch.tensor(parents, device=device)
            for layer in model.layers:
                cache = layer.attn.kv_cache
                cache.k_cache.copy_(cache.k_cache.index_select(0, index))
                cache.v_cache.copy_(cache.v_cache.index_select(0, index))
            cursor = longest + step
            mask = (real & (columns <= cursor))[:, None, :]
            step_tokens = torch.tensor(chosen, device=device)[:, None]
            h = hidden_states(model, step_tokens, mask, (lengths + step)[:, None])
            top = torch.log_softmax(model.unembed(h[:, -1]).float(), dim=-1).topk(k, dim=-1)
