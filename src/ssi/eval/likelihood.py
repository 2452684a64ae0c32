"""Log-probabilities of scored tokens, by two backends that agree to 1e-3 per item in fp32 (tested).

- torch: the torchtune decoder, one forward per batch of items. An item's two sequences share their
  longest common prefix: one row holds `[common prefix | rest of positive | rest of negative]`, each rest
  attending to the common part and to itself only, with positions continuing from the common part (a
  two-branch tree), so the shared context is computed once. Only the positions whose next token is
  scored are projected onto the vocabulary, in fp32 log-softmax.
- vllm: every sequence is a prompt with `prompt_logprobs=0` (the log-probability of each prompt token
  given the tokens before it). vLLM 0.32 does not read its prefix cache for prompt-logprob requests, so
  each sequence is computed in full: nothing is shared.

Both return, per item, (sum of the positive's scored log-probs, number of them) and the same for the
negative; sums are accumulated in float64.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchtune.modules import TransformerDecoder
from tqdm import tqdm

from ssi.eval.sequences import ScoredSequence
from ssi.model.engines import hidden_states

Pair = tuple[ScoredSequence, ScoredSequence]
Totals = tuple[float, int]  # (sum of log-probs, number of scored tokens)
# Logits computed at once: rows x vocabulary floats (2**27 = 512 MiB in fp32).
_LOGIT_BUDGET = 1 << 27
# Sequences per vLLM call: bounds the Python objects holding prompt logprobs.
_VLLM_CHUNK = 2048


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _layout(pair: Pair) -> tuple[list[int], list[int], list[int], list[list[tuple[int, int]]]]:
    """The tree row of one item: tokens, positions, branch id per column (0 = shared), and for each
    sequence the (column predicting it, target token) of every scored token."""
    seqs = [s.tokens for s in pair]
    shared = common_prefix(*seqs)
    tokens, positions, branch = list(seqs[0][:shared]), list(range(shared)), [0] * shared
    targets = []
    for k, seq in enumerate(seqs, start=1):
        offset = len(tokens) - shared  # column of position `shared` in this branch, minus `shared`
        tokens += seq[shared:]
        positions += range(shared, len(seq))
        branch += [k] * (len(seq) - shared)
        start = pair[k - 1].start
        targets.append([((i - 1) if i - 1 < shared else (i - 1 + offset), seq[i]) for i in range(start, len(seq))])
    return tokens, positions, branch, targets


def tree_length(pair: Pair) -> int:
    return sum(len(s.tokens) for s in pair) - common_prefix(pair[0].tokens, pair[1].tokens)


def _tree_mask(branch: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """[batch, seq, seq]: causal, within the shared part or one's own branch; padding sees only itself."""
    n = branch.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool, device=branch.device).tril()
    same = (branch[:, None, :] == 0) | (branch[:, None, :] == branch[:, :, None])
    mask = causal & same & real[:, None, :] & real[:, :, None]
    return mask | torch.eye(n, dtype=torch.bool, device=branch.device)


def score_torch(
    model: TransformerDecoder,
    pairs: Sequence[Pair],
    *,
    batch_size: int,
    pad_id: int,
    device: torch.device,
    progress: bool = True,
) -> list[tuple[Totals, Totals]]:
    """Per item, the (sum, count) of the positive's and the negative's scored log-probabilities."""
    order = sorted(range(len(pairs)), key=lambda i: -tree_length(pairs[i]))  # similar lengths share a batch
    results: list[tuple[Totals, Totals] | None] = [None] * len(pairs)
    vocab_size = model.tok_embeddings.num_embeddings
    model.eval()
    with torch.inference_mode(), tqdm(total=len(pairs), desc="scoring (torch)", disable=not progress) as bar:
        for begin in range(0, len(order), batch_size):
            index = order[begin : begin + batch_size]
            rows = [_layout(pairs[i]) for i in index]
            width = max(len(r[0]) for r in rows)
            tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
            positions = torch.zeros((len(rows), width), dtype=torch.long)
            branch = torch.full((len(rows), width), -1, dtype=torch.long)
            for b, (ids, pos, br, _) in enumerate(rows):
                tokens[b, : len(ids)], positions[b, : len(ids)] = torch.tensor(ids), torch.tensor(pos)
                branch[b, : len(ids)] = torch.tensor(br)
            tokens, positions, branch = tokens.to(device), positions.to(device), branch.to(device)
            h = hidden_states(model, tokens, _tree_mask(branch, branch >= 0), positions)
            picks = [(b, k, col, target) for b, r in enumerate(rows) for k in (0, 1) for col, target in r[3][k]]
            logprobs = _target_logprobs(model, h, picks, vocab_size)
            sums = [[0.0, 0.0] for _ in rows]
            for (b, k, _, _), value in zip(picks, logprobs, strict=True):
                sums[b][k] += value
            for b, i in enumerate(index):
                counts = [len(rows[b][3][k]) for k in (0, 1)]
                results[i] = ((sums[b][0], counts[0]), (sums[b][1], counts[1]))
            bar.update(len(index))
    return [r for r in results if r is not None]


def _target_logprobs(
    model: TransformerDecoder, h: torch.Tensor, picks: list[tuple[int, int, int, int]], vocab_size: int
) -> list[float]:
    """fp32 log-softmax at the picked columns, read at their targets, in chunks of bounded size."""
    rows = torch.tensor([p[0] for p in picks], device=h.device)
    cols = torch.tensor([p[2] for p in picks], device=h.device)
    targets = torch.tensor([p[3] for p in picks], device=h.device)
    chunk = max(1, _LOGIT_BUDGET // vocab_size)
    out: list[float] = []
    for begin in range(0, len(picks), chunk):
        sl = slice(begin, begin + chunk)
        logits = model.unembed(h[rows[sl], cols[sl]][None])[0].float()
        picked = torch.log_softmax(logits, dim=-1).gather(1, targets[sl, None])[:, 0]
        out.extend(picked.double().tolist())
    return out


def score_vllm(llm: Any, pairs: Sequence[Pair], *, progress: bool = True) -> list[tuple[Totals, Totals]]:
    """Per item, the (sum, count) of the positive's and the negative's scored log-probabilities, from
    vLLM's prompt logprobs (entry i scores prompt token i given tokens < i)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
    sequences = [s for pair in pairs for s in pair]
    totals: list[Totals] = []
    with tqdm(total=len(pairs), desc="scoring (vllm)", disable=not progress) as bar:
        for begin in range(0, len(sequences), _VLLM_CHUNK):
            chunk = sequences[begin : begin + _VLLM_CHUNK]
            outputs = llm.generate([TokensPrompt(prompt_token_ids=s.tokens) for s in chunk], params, use_tqdm=False)
            for seq, out in zip(chunk, outputs, strict=True):
                entries = out.prompt_logprobs
                total = sum(float(entries[i][seq.tokens[i]].logprob) for i in range(seq.start, len(seq.tokens)))
                totals.append((total, seq.n_scored))
            bar.update(len(chunk) // 2)
    return [(totals[2 * i], totals[2 * i + 1]) for i in range(len(pairs))]
