"""What a Llama 3.x config.json says about the network, in the terms torchtune's builders take.

Anything torchtune's Llama 3.2 component builder would not reproduce exactly (another activation,
biases, a rope scaling other than Llama 3's, a head size that is not hidden / heads) is refused with
the key named, instead of silently training a different network. Both spellings of the config are
read: the hub's (`rope_theta`, `rope_scaling`, `torch_dtype`) and transformers 5's (`rope_parameters`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torchtune.models import convert_weights

from ssi.hf_dir import ModelDirError, config_rope_scaling, read_llama_config


class CheckpointError(ValueError):
    """A model directory, config or checkpoint that cannot be loaded or written as asked."""


@dataclass(frozen=True)
class Llama3RopeScaling:
    """Llama 3.1+ frequency-dependent RoPE scaling (HF rope_type `llama3`)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class LlamaArchitecture:
    """What config.json says about the network, in the terms torchtune's builders take."""

    vocab_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    embed_dim: int
    intermediate_dim: int
    norm_eps: float
    rope_base: float
    rope_scaling: Llama3RopeScaling | None
    tie_word_embeddings: bool
    max_position_embeddings: int
    attn_dropout: float = 0.0

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @classmethod
    def from_config(cls, config: dict[str, Any], source: str = "config.json") -> LlamaArchitecture:
        """Parse and validate an HF Llama config; anything torchtune's Llama 3.2 builder would not
        reproduce exactly is refused, naming the key."""

        def need(key: str) -> Any:
            if key not in config or config[key] is None:
                raise CheckpointError(f"{source}: required key {key!r} is missing")
            return config[key]

        def refuse_unless(ok: bool, key: str, expected: str) -> None:
            if not ok:
                raise CheckpointError(
                    f"{source}: {key}={config.get(key)!r} is not supported ({expected}); "
                    "torchtune's Llama 3 builder cannot represent this model"
                )

        if config.get("model_type", "llama") != "llama":
            raise CheckpointError(f"{source}: model_type is {config.get('model_type')!r}, expected 'llama'")
        num_heads = int(need("num_attention_heads"))
        embed_dim = int(need("hidden_size"))
        num_kv_heads = int(config.get("num_key_value_heads") or num_heads)
        if embed_dim % num_heads or num_heads % num_kv_heads:
            raise CheckpointError(
                f"{source}: hidden_size {embed_dim}, num_attention_heads {num_heads} and num_key_value_heads "
                f"{num_kv_heads} do not divide evenly"
            )
        head_dim = config.get("head_dim")
        refuse_unless(
            head_dim in (None, embed_dim // num_heads), "head_dim", "must equal hidden_size / num_attention_heads"
        )
        refuse_unless(config.get("hidden_act", "silu") == "silu", "hidden_act", "expected 'silu'")
        refuse_unless(not config.get("attention_bias", False), "attention_bias", "expected false")
        refuse_unless(not config.get("mlp_bias", False), "mlp_bias", "expected false")
        return cls(
            vocab_size=int(need("vocab_size")),
            num_layers=int(need("num_hidden_layers")),
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            embed_dim=embed_dim,
            intermediate_dim=int(need("intermediate_size")),
            norm_eps=float(config.get("rms_norm_eps", 1e-6)),  # transformers' LlamaConfig defaults
            rope_base=float(_rope_theta(config)),
            rope_scaling=_rope_scaling(config, source),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            max_position_embeddings=int(need("max_position_embeddings")),
            attn_dropout=float(config.get("attention_dropout", 0.0)),
        )

    def hf_weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor an HF checkpoint of this model holds, with its shape (tied: no lm_head)."""
        h, kv, ffn = self.embed_dim, self.num_kv_heads * self.head_dim, self.intermediate_dim
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab_size, h)}
        for i in range(self.num_layers):
            p = f"model.layers.{i}."
            shapes |= {
                p + "self_attn.q_proj.weight": (h, h),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.o_proj.weight": (h, h),
                p + "mlp.gate_proj.weight": (ffn, h),
                p + "mlp.up_proj.weight": (ffn, h),
                p + "mlp.down_proj.weight": (h, ffn),
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
            }
        shapes["model.norm.weight"] = (h,)
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (self.vocab_size, h)
        return shapes

    def hf_to_tune(self, hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """torchtune's conversion (q/k rows permuted from HF's half-split RoPE layout to interleaved)."""
        return convert_weights.hf_to_tune(hf_state, self.num_heads, self.num_kv_heads, self.embed_dim, self.head_dim)

    def tune_to_hf(self, tune_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return convert_weights.tune_to_hf(tune_state, self.num_heads, self.num_kv_heads, self.embed_dim, self.head_dim)

    def tune_to_hf_names(self) -> dict[str, str]:
        """torchtune parameter name -> HF tensor name, in HF file order (derived through torchtune's own
        mapping on meta tensors, so the two can never disagree)."""
        return {
            next(iter(self.hf_to_tune({hf: torch.empty(shape, device="meta")}))): hf
            for hf, shape in self.hf_weight_shapes().items()
        }


def _rope_theta(config: dict[str, Any]) -> float:
    """`rope_theta` at the top level (hub files) or inside `rope_parameters` (transformers 5)."""
    if config.get("rope_theta") is not None:
        return config["rope_theta"]
    params = config.get("rope_parameters") or {}
    return params.get("rope_theta", 10000.0)  # transformers' default


def _rope_scaling(config: dict[str, Any], source: str) -> Llama3RopeScaling | None:
    scaling = config_rope_scaling(config)
    if not scaling:
        return None
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type == "default":
        return None
    if rope_type != "llama3":
        raise CheckpointError(
            f"{source}: rope scaling of type {rope_type!r} is not supported (only 'llama3' scaling, as in "
            "Llama 3.1/3.2, or none); torchtune's Llama 3 builder cannot represent this model"
        )
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in keys if scaling.get(k) is None]
    if missing:
        raise CheckpointError(f"{source}: llama3 rope scaling lacks {missing}")
    rope = Llama3RopeScaling(
        float(scaling["factor"]),
        float(scaling["low_freq_factor"]),
        float(scaling["high_freq_factor"]),
        int(scaling["original_max_position_embeddings"]),
    )
    if rope.high_freq_factor <= rope.low_freq_factor or rope.factor <= 0:
        raise CheckpointError(f"{source}: llama3 rope scaling needs factor > 0 and high_freq_factor > low_freq_factor")
    return rope


def read_architecture(model_dir_or_config: str | Path | dict[str, Any]) -> LlamaArchitecture:
    """The architecture of an HF model directory (its config.json) or of a config dict."""
    if isinstance(model_dir_or_config, dict):
        return LlamaArchitecture.from_config(model_dir_or_config)
    model_dir = Path(model_dir_or_config)
    return LlamaArchitecture.from_config(read_config(model_dir), source=str(model_dir / "config.json"))


def read_config(model_dir: Path) -> dict[str, Any]:
    try:
        return read_llama_config(model_dir)
    except ModelDirError as err:
        raise CheckpointError(str(err)) from None
