"""Batch collation (padded or packed) and per-batch token accounting.

Both collators return what torchtune's models and the training loop expect: `tokens` and `labels`
([B, L] long tensors; labels -100 where masked or padded, not yet shifted), plus
`token_counts` = {text, dsu, special, padding} as 0-dim tensors so the loop can log what it trains on.
Packed batches add `input_pos` and a block-causal `mask` (torchtune's packed format: no token attends
across documents).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX
from torchtune.modules.attention_utils import packed_block_causal_mask

from ssi.tokens import SpeechVocab


@dataclass(frozen=True)
class TokenKinds:
    """Id ranges of one vocabulary, to count text / DSU / special tokens in a batch."""

    n_bpe: int
    dsu_start: int
    dsu_end: int

    @classmethod
    def from_vocab(cls, vocab: SpeechVocab) -> TokenKinds:
        return cls(vocab.n_bpe, vocab.dsu_start, vocab.dsu_end)

    def kind_of(self, token_id: int) -> str:
        if token_id < self.n_bpe:
            return "text"
        return "dsu" if self.dsu_start <= token_id < self.dsu_end else "special"


def count_token_kinds(tokens: torch.Tensor, valid: torch.Tensor, kinds: TokenKinds) -> dict[str, torch.Tensor]:
    """Counts of text, DSU, special (Llama 3 and modality) and padding positions; `valid` marks non-padding."""
    is_text = (tokens < kinds.n_bpe) & valid
    is_dsu = (tokens >= kinds.dsu_start) & (tokens < kinds.dsu_end) & valid
    n_valid = valid.sum()
    n_text, n_dsu = is_text.sum(), is_dsu.sum()
    return {
        "text": n_text,
        "dsu": n_dsu,
        "special": n_valid - n_text - n_dsu,
        "padding": torch.tensor(valid.numel()) - n_valid,
    }


def collate_padded(
    batch: Sequence[dict[str, Any]],
    pad_id: int,
    kinds: TokenKinds,
    pad_to_multiple_of: int = 1,
) -> dict[str, Any]:
    """Right-pad `tokens` with `pad_id` and `labels` with -100 to the longest sample (rounded up)."""
    if not batch:
        raise ValueError("cannot collate an empty batch")
    longest = max(len(s["tokens"]) for s in batch)
    length = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    tokens = torch.full((len(batch), length), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), length), CROSS_ENTROPY_IGNORE_IDX, dtype=torch.long)
    valid = torch.zeros((len(batch), length), dtype=torch.bool)
    for row, sample in enumerate(batch):
        n = len(sample["tokens"])
        if len(sample["labels"]) != n:
            raise ValueError(f"batch row {row}: {n} tokens but {len(sample['labels'])} labels")
        tokens[row, :n] = torch.as_tensor(sample["tokens"], dtype=torch.long)
        labels[row, :n] = torch.as_tensor(sample["labels"], dtype=torch.long)
        valid[row, :n] = True
    return {"tokens": tokens, "labels": labels, "token_counts": count_token_kinds(tokens, valid, kinds)}


def collate_packed(batch: Sequence[dict[str, torch.Tensor]], kinds: TokenKinds) -> dict[str, Any]:
    """Stack packs from `PackedDataset` and build the block-causal document mask from `seq_lens`.

    On CUDA with flex attention the mask is a BlockMask, elsewhere a dense [B, L, L] bool tensor
    (torchtune's `packed_block_causal_mask`).
    """
    tokens = torch.stack([p["tokens"] for p in batch])
    valid = torch.stack([torch.arange(p["tokens"].numel()) < p["tokens"].numel() - int(p["n_padding"]) for p in batch])
    return {
        "tokens": tokens,
        "labels": torch.stack([p["labels"] for p in batch]),
        "input_pos": torch.stack([p["input_pos"] for p in batch]),
        "mask": packed_block_causal_mask(seq_lens=[p["seq_lens"] for p in batch]),
        "token_counts": count_token_kinds(tokens, valid, kinds),
    }
