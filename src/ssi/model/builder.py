"""The torchtune Llama 3.x decoder for an architecture read from config.json, at any size."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torchtune.models.llama3_1._position_embeddings import Llama3ScaledRoPE
from torchtune.models.llama3_2._component_builders import llama3_2
from torchtune.modules import RotaryPositionalEmbeddings, TransformerDecoder

from ssi.model.architecture import CheckpointError, LlamaArchitecture, read_architecture

# low_freq_factor, high_freq_factor and original context that torchtune's llama3_2 builder hard-codes.
_BUILDER_ROPE = (1.0, 4.0, 8192)


def build_model(
    model_dir_or_config: str | Path | dict[str, Any] | LlamaArchitecture, max_seq_len: int | None = None
) -> TransformerDecoder:
    """The torchtune Llama 3.x decoder described by a config.json, with uninitialised-but-allocated
    weights (load them with `SpeechCheckpointer.load_checkpoint`).

    Built by torchtune's Llama 3.2 component builder; its RoPE is replaced only when the config's
    rope scaling differs from the one the builder hard-codes (low/high freq factor 1/4, original
    context 8192) or is absent (Llama 3.0-style plain RoPE). Build under `torch.device("meta")` or
    `torchtune.training.set_default_dtype` as torchtune's recipes do. `max_seq_len` (default: the
    config's max_position_embeddings) sizes the RoPE cache.
    """
    arch = (
        model_dir_or_config
        if isinstance(model_dir_or_config, LlamaArchitecture)
        else read_architecture(model_dir_or_config)
    )
    max_seq_len = arch.max_position_embeddings if max_seq_len is None else int(max_seq_len)
    if max_seq_len <= 0:
        raise CheckpointError(f"max_seq_len must be positive, got {max_seq_len}")
    scaling = arch.rope_scaling
    model = llama3_2(
        vocab_size=arch.vocab_size,
        num_layers=arch.num_layers,
        num_heads=arch.num_heads,
        num_kv_heads=arch.num_kv_heads,
        embed_dim=arch.embed_dim,
        max_seq_len=max_seq_len,
        attn_dropout=arch.attn_dropout,
        rope_base=arch.rope_base,
        intermediate_dim=arch.intermediate_dim,
        norm_eps=arch.norm_eps,
        scale_factor=scaling.factor if scaling else 1,
        tie_word_embeddings=arch.tie_word_embeddings,
    )
    if scaling is None or (
        (scaling.low_freq_factor, scaling.high_freq_factor, scaling.original_max_position_embeddings) != _BUILDER_ROPE
    ):
        rope = _rope_module(arch, max_seq_len)
        for layer in model.layers:  # one module shared by all layers, as the builder does
            layer.attn.pos_embeddings = rope
    return model


def _rope_module(arch: LlamaArchitecture, max_seq_len: int) -> torch.nn.Module:
    if arch.rope_scaling is None:
        return RotaryPositionalEmbeddings(dim=arch.head_dim, max_seq_len=max_seq_len, base=arch.rope_base)
    s = arch.rope_scaling
    return Llama3ScaledRoPE(
        dim=arch.head_dim,
        max_seq_len=max_seq_len,
        base=arch.rope_base,
        scale_factor=s.factor,
        low_freq_factor=s.low_freq_factor,
        high_freq_factor=s.high_freq_factor,
        old_context_len=s.original_max_position_embeddings,
    )
