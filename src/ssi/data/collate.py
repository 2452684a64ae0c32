"""Batch collation (padded or packed) and per-batch token accounting.

Both collators return what torchtune's models and the training loop expect: `tokens` and `labels`
([B, L] long tensors; labels -100 where masked or padded, not yet shifted), plus
`token_counts` = {text, dsu, special, padding} as 0-dim tensors so the loop can log what it trains on
(audio batches add `audio`, their count of audio slots, and the waveforms under `audio`).
Packed batches add `input_pos` and `seq_lens` (document lengths per pack). Their block-causal mask (no
token attends across documents) is built by `block_causal_mask` on the training device, in the training
process: collate functions run in DataLoader workers, which must never touch CUDA (a forked worker cannot
initialise it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX
from torchtune.modules.attention_utils import create_block_causal_mask
from torchtune.utils._import_guard import _SUPPORTS_FLEX_ATTENTION

from ssi.vocab.layout import SpeechVocab
from ssi.vocab.tiktoken import AUDIO_SLOT


def count_token_kinds(tokens: torch.Tensor, valid: torch.Tensor, vocab: SpeechVocab) -> dict[str, torch.Tensor]:
    """Counts of text, DSU, special (Llama 3 and modality) and padding positions; `valid` marks non-padding.
    The vectorised twin of `SpeechVocab.kind_of`."""
    is_text = (tokens < vocab.n_bpe) & valid
    is_dsu = (tokens >= vocab.dsu_start) & (tokens < vocab.dsu_end) & valid
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
    vocab: SpeechVocab,
    pad_to_multiple_of: int = 1,
    max_length: int | None = None,
) -> dict[str, Any]:
    """Right-pad `tokens` with `pad_id` and `labels` with -100 to the longest sample, rounded up to a
    multiple of `pad_to_multiple_of` but not past `max_length` (the model's sequence limit)."""
    tokens, labels, valid = _pad(batch, pad_id, pad_to_multiple_of, max_length)
    return {"tokens": tokens, "labels": labels, "token_counts": count_token_kinds(tokens, valid, vocab)}


def collate_audio(
    batch: Sequence[dict[str, Any]],
    pad_id: int,
    n_bpe: int,
    pad_to_multiple_of: int = 1,
    max_length: int | None = None,
) -> dict[str, Any]:
    """Padded examples for a model read without speech tokens (the features method): as `collate_padded`,
    plus `audio` (the waveforms of ASR examples with audio, ssi.data.audio_sft, unpadded: the speech encoder
    pads them with their masks) and the count of `audio` slots; text below `n_bpe`, the rest special."""
    tokens, labels, valid = _pad(batch, pad_id, pad_to_multiple_of, max_length)
    is_audio = tokens == AUDIO_SLOT
    is_text = (tokens >= 0) & (tokens < n_bpe) & valid
    n_valid, n_audio, n_text = valid.sum(), is_audio.sum(), is_text.sum()
    counts = {
        "text": n_text,
        "dsu": torch.tensor(0),
        "special": n_valid - n_text - n_audio,
        "padding": torch.tensor(valid.numel()) - n_valid,
        "audio": n_audio,
    }
    collated = {"tokens": tokens, "labels": labels, "token_counts": counts}
    if "audio" in batch[0]:
        collated["audio"] = [sample["audio"] for sample in batch]
    return collated


def _pad(
    batch: Sequence[dict[str, Any]], pad_id: int, pad_to_multiple_of: int, max_length: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """tokens, labels and the mask of real positions, right-padded to a common length."""
    if not batch:
        raise ValueError("cannot collate an empty batch")
    longest = max(len(s["tokens"]) for s in batch)
    length = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    if max_length is not None:
        length = max(longest, min(length, max_length))
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
    return tokens, labels, valid


def collate_packed(batch: Sequence[dict[str, torch.Tensor]], vocab: SpeechVocab) -> dict[str, Any]:
    """Stack packs from `PackedDataset`; `seq_lens` stays a list (packs hold different numbers of documents)."""
    tokens = torch.stack([p["tokens"] for p in batch])
    valid = torch.stack([torch.arange(p["tokens"].numel()) < p["tokens"].numel() - int(p["n_padding"]) for p in batch])
    return {
        "tokens": tokens,
        "labels": torch.stack([p["labels"] for p in batch]),
        "input_pos": torch.stack([p["input_pos"] for p in batch]),
        "seq_lens": [p["seq_lens"] for p in batch],
        "token_counts": count_token_kinds(tokens, valid, vocab),
    }


def block_causal_mask(seq_lens: Sequence[torch.Tensor], device: torch.device) -> Any:
    """The document mask of a packed batch, built on `device`: a flex-attention BlockMask on GPUs that
    torchtune runs flex attention on, elsewhere a dense [B, L, L] bool tensor (torchtune's packed format)."""
    if device.type == "cuda" and _SUPPORTS_FLEX_ATTENTION:
        from torch.nn.attention.flex_attention import create_block_mask

        document_ids = torch.stack(
            [torch.repeat_interleave(torch.arange(len(lens)), lens.long()) for lens in seq_lens]
        ).to(device, non_blocking=True)

        def same_document_causal(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
            return (q_idx >= kv_idx) & (document_ids[b, q_idx] == document_ids[b, kv_idx])

        batch, length = document_ids.shape
        return create_block_mask(same_document_causal, batch, None, length, length, device=device)
    return create_block_causal_mask([lens.to(device) for lens in seq_lens])
