"""Low-rank adapters on the decoder's linear layers, named as PEFT names them, merged and exported for PEFT.

Users choose modules by their HF names (`q_proj` ... `down_proj`, as in PEFT's `target_modules`);
`TUNE_MODULES` maps them to torchtune's. Each chosen linear becomes torchtune's `LoRALinear`, which keeps
the frozen weight under the same name (`layers.0.attn.q_proj.weight`) and adds `lora_a.weight` [rank x in]
and `lora_b.weight` [out x rank]: the output is W x + (alpha / rank) B A x. torchtune's module is used as
is (its LoRA recipes shard it with FSDP2); the layers of torchtune's own LoRA builders are not, because
they apply LoRA to the MLP as a whole and we take any subset of its three projections.

The initial adapter weights come from a seeded generator on the CPU, so one process and N ranks start
from the same adapter (A: Kaiming-uniform as in the LoRA paper's code, B: zeros, so training starts at
the base model). `merge` folds the adapters into the weights in fp32 (W + scale B A) for the complete HF
checkpoints, which keep them in fp32 (ssi.model.checkpointer.MergedWeights); `peft_adapter` writes the same
adapters (and the trainable new rows) in PEFT's format.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torchtune.modules.peft import LoRALinear

from ssi.model.architecture import LlamaArchitecture

# HF (PEFT) module name -> the torchtune module inside each decoder layer.
TUNE_MODULES = {
    "q_proj": "attn.q_proj",
    "k_proj": "attn.k_proj",
    "v_proj": "attn.v_proj",
    "o_proj": "attn.output_proj",
    "gate_proj": "mlp.w1",
    "up_proj": "mlp.w3",
    "down_proj": "mlp.w2",
}
_ROPE_PERMUTED = ("q_proj", "k_proj")  # rows torchtune keeps interleaved and HF half-split (RoPE layout)
LORA_A, LORA_B = "lora_a.weight", "lora_b.weight"


class LoraError(ValueError):
    """LoRA settings that cannot be applied."""


@dataclass(frozen=True)
class LoraSettings:
    """The `lora.*` keys (conf/training.yaml), checked at the door."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    modules: tuple[str, ...] = tuple(TUNE_MODULES)
    train_new_embeddings: bool = True

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise LoraError(f"lora.rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise LoraError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        unknown = [m for m in self.modules if m not in TUNE_MODULES]
        if unknown or not self.modules:
            raise LoraError(
                f"lora.modules: {unknown or 'an empty list'} is not a choice of {list(TUNE_MODULES)} (HF module names)"
            )

    @classmethod
    def from_config(cls, section: Any) -> LoraSettings:
        return cls(
            rank=int(section.rank),
            alpha=float(section.alpha),
            dropout=float(section.dropout),
            modules=tuple(dict.fromkeys(str(m) for m in section.modules)),
            train_new_embeddings=bool(section.train_new_embeddings),
        )

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _targets(n_layers: int, settings: LoraSettings) -> dict[str, str]:
    """torchtune module path (`layers.3.attn.q_proj`) -> HF module name (`q_proj`) of every adapted linear."""
    return {f"layers.{i}.{TUNE_MODULES[m]}": m for i in range(n_layers) for m in settings.modules}


def add_lora(model: nn.Module, settings: LoraSettings) -> None:
    """Replace each chosen linear of every decoder layer by a `LoRALinear` of the same shape, on the current
    default device and dtype (its weights are loaded afterwards, see `initial_adapters`)."""
    for path in _targets(len(model.layers), settings):
        parent_path, name = path.rsplit(".", 1)
        parent = model.get_submodule(parent_path)
        linear = getattr(parent, name)
        if linear.bias is not None:
            raise LoraError(f"{path} has a bias; Llama 3's linear layers have none")
        setattr(
            parent,
            name,
            LoRALinear(linear.in_features, linear.out_features, settings.rank, settings.alpha, settings.dropout),
        )


def initial_adapters(arch: LlamaArchitecture, settings: LoraSettings, seed: int) -> dict[str, torch.Tensor]:
    """fp32 starting values of every adapter (A: Kaiming-uniform with a = sqrt(5), B: zeros), drawn on the
    CPU from `seed`, in the model's state-dict names."""
    generator = torch.Generator().manual_seed(seed)
    shapes = arch.hf_weight_shapes()
    adapters = {}
    for path, module in _targets(arch.num_layers, settings).items():
        out_dim, in_dim = shapes[_hf_weight_name(path, module)]
        bound = 1.0 / math.sqrt(in_dim)  # kaiming_uniform_(a=sqrt(5)) on a [rank x in] matrix
        adapters[f"{path}.{LORA_A}"] = torch.empty(settings.rank, in_dim).uniform_(-bound, bound, generator=generator)
        adapters[f"{path}.{LORA_B}"] = torch.zeros(out_dim, settings.rank)
    return adapters


def _hf_weight_name(path: str, module: str) -> str:
    """`layers.3.attn.q_proj` -> `model.layers.3.self_attn.q_proj.weight`."""
    layer = path.split(".")[1]
    block = "self_attn" if TUNE_MODULES[module].startswith("attn.") else "mlp"
    return f"model.layers.{layer}.{block}.{module}.weight"


def adapter_names(state: dict[str, torch.Tensor]) -> list[str]:
    return [k for k in state if k.endswith((f".{LORA_A}", f".{LORA_B}"))]


def merge(state: dict[str, torch.Tensor], settings: LoraSettings) -> dict[str, torch.Tensor]:
    """A LoRA model's state dict with every adapter folded into its weight: W + scale B A, computed in fp32
    (the merged weight is fp32, and is saved so: in a bf16 file a small delta rounds away)."""
    out = {k: v for k, v in state.items() if k not in set(adapter_names(state))}
    for a_name in (k for k in state if k.endswith(f".{LORA_A}")):
        path = a_name.removesuffix(f".{LORA_A}")
        a, b = state[a_name].float(), state[f"{path}.{LORA_B}"].float()
        out[f"{path}.weight"] = state[f"{path}.weight"].float() + settings.scale * (b @ a)
    return out


def _hf_rows(b: torch.Tensor, arch: LlamaArchitecture, module: str) -> torch.Tensor:
    """B's rows in HF's order: q/k rows are permuted from torchtune's interleaved RoPE layout as the weights
    are (convert_weights.tune_to_hf), with the rank in place of the input dimension."""
    if module not in _ROPE_PERMUTED:
        return b
    heads = arch.num_heads if module == "q_proj" else arch.num_kv_heads
    head_dim = arch.head_dim
    return b.view(heads, head_dim // 2, 2, -1).transpose(1, 2).reshape(heads * head_dim, -1)


def peft_adapter(
    state: dict[str, torch.Tensor],
    settings: LoraSettings,
    arch: LlamaArchitecture,
    new_rows: dict[str, torch.Tensor],
    first_new: int,
    base_model: str,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """`adapter_config.json` and `adapter_model.safetensors` contents in PEFT's LoRA format (0.21), such that
    `PeftModel.from_pretrained(<the extended base>, <adapter dir>)` computes what the merged checkpoint does.

    The new rows (`new_rows`: torchtune matrix name -> [n_new x hidden]) are PEFT trainable tokens
    (`trainable_token_indices`, stored as `<module>.token_adapter.trainable_tokens_delta`, which holds the
    rows' values); a tied head is covered by the embedding's entry, as PEFT ties them itself."""
    prefix = "base_model.model."
    tensors: dict[str, torch.Tensor] = {}
    for path, module in _targets(arch.num_layers, settings).items():
        where = prefix + _hf_weight_name(path, module).removesuffix(".weight")
        tensors[f"{where}.lora_A.weight"] = state[f"{path}.{LORA_A}"].float().contiguous()
        tensors[f"{where}.lora_B.weight"] = _hf_rows(state[f"{path}.{LORA_B}"].float(), arch, module).contiguous()
    hf_matrix = {
        "tok_embeddings": ("embed_tokens", f"{prefix}model.embed_tokens"),
        "output": ("lm_head", f"{prefix}lm_head"),
    }
    token_indices: dict[str, list[int]] = {}
    for matrix, rows in new_rows.items():
        name, where = hf_matrix[matrix]
        token_indices[name] = list(range(first_new, first_new + rows.shape[0]))
        tensors[f"{where}.token_adapter.trainable_tokens_delta"] = rows.float().contiguous()
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": settings.rank,
        "lora_alpha": settings.alpha,
        "lora_dropout": settings.dropout,
        "target_modules": sorted(settings.modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "trainable_token_indices": token_indices or None,
    }
    return config, tensors
