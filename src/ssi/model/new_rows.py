"""The vocabulary rows that extension added, as a trainable parameter of their own next to the frozen base rows.

Training only the new rows of a [vocab x hidden] matrix through a row mask keeps a full-size gradient and
two full-size Adam states for a matrix that is almost entirely frozen (3 GB at Llama 3.1 8B's 128k x 4096).
Here the matrix is held as two tensors instead: `base` (rows `0 .. first_new-1`, frozen) and `new` (the
rest, trainable). Looking up embeddings and projecting onto the vocabulary never concatenate them, so
the base rows get no gradient at all and stay bit-identical by construction (docs/training.md).

`split_rows(model, first_new)` installs this on a torchtune decoder (the input embedding, and the output
head when it is untied; a tied head projects onto the same two tensors). `join_rows(state)` turns such
a model's state dict back into the ordinary one (`tok_embeddings.weight`, `output.weight`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BASE, NEW = "base", "new"
_MATRICES = ("tok_embeddings", "output")  # torchtune's names for the input embedding and the output head


class SplitRows(nn.Module):
    """A [vocab x hidden] matrix held as frozen `base` rows and trainable `new` rows."""

    def __init__(self, vocab_size: int, dim: int, first_new: int) -> None:
        super().__init__()
        if not 0 < first_new < vocab_size:
            raise ValueError(f"first_new must lie inside the vocabulary (1..{vocab_size - 1}), got {first_new}")
        self.first_new = first_new
        self.base = nn.Parameter(torch.empty(first_new, dim), requires_grad=False)
        self.new = nn.Parameter(torch.empty(vocab_size - first_new, dim))

    @property
    def weight(self) -> torch.Tensor:
        """The whole matrix (a copy): for callers that need it at once, e.g. the fused linear loss."""
        return torch.cat([self.base, self.new.to(self.base.dtype)])

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        is_new = tokens >= self.first_new
        base = F.embedding(tokens.masked_fill(is_new, 0), self.base)
        new = F.embedding((tokens - self.first_new).clamp(min=0), self.new)
        return torch.where(is_new.unsqueeze(-1), new.to(base.dtype), base)

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.cat([F.linear(hidden, self.base), F.linear(hidden, self.new)], dim=-1)


class SplitEmbedding(SplitRows):
    """The input embedding (`tok_embeddings`) with split rows."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embed(tokens)


class SplitHead(SplitRows):
    """An untied output head (`output`) with split rows."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.project(hidden)


class TiedSplitHead:
    """A tied output head: projects onto the embedding's two tensors. Not a module (as torchtune's
    TiedLinear), so the tensors are registered once, under `tok_embeddings`."""

    def __init__(self, embedding: SplitEmbedding) -> None:
        self.embedding = embedding

    @property
    def weight(self) -> torch.Tensor:
        return self.embedding.weight

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.embedding.project(hidden)


def split_rows(model: nn.Module, first_new: int) -> None:
    """Replace the decoder's embedding (and untied head) by split-row versions of the same shape, built on
    the current default device and dtype (load their weights with `rows_state`)."""
    vocab_size, dim = model.tok_embeddings.weight.shape
    embedding = SplitEmbedding(vocab_size, dim, first_new)
    model.tok_embeddings = embedding
    if isinstance(model.output, nn.Module):
        model.output = SplitHead(vocab_size, dim, first_new)
    else:
        model.output = TiedSplitHead(embedding)


def rows_state(state: dict[str, torch.Tensor], first_new: int) -> dict[str, torch.Tensor]:
    """An ordinary decoder state dict, in the names of a model after `split_rows`."""
    out = dict(state)
    for matrix in _MATRICES:
        weight = out.pop(f"{matrix}.weight", None)
        if weight is not None:
            out[f"{matrix}.{BASE}"], out[f"{matrix}.{NEW}"] = weight[:first_new], weight[first_new:]
    return out


def join_rows(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `rows_state`: each split matrix as one tensor, in the more precise of its two dtypes
    (frozen bf16 base rows next to fp32 new rows: fp32, so the checkpointer rounds the new rows once)."""
    out = dict(state)
    for matrix in _MATRICES:
        base = out.pop(f"{matrix}.{BASE}", None)
        if base is not None:
            new = out.pop(f"{matrix}.{NEW}")
            dtype = torch.promote_types(base.dtype, new.dtype)
            out[f"{matrix}.weight"] = torch.cat([base.to(dtype), new.to(dtype)])
    return out


def trained_rows(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The trained new rows of a split model's state dict, by matrix (`tok_embeddings`, and `output` when untied)."""
    return {matrix: state[f"{matrix}.{NEW}"] for matrix in _MATRICES if f"{matrix}.{NEW}" in state}
