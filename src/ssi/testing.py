"""Llama-3.2-shaped HF model directories with random weights, for tests, benchmarks and the demo.

`write_llama_dir` writes what a hub snapshot of meta-llama/Llama-3.2-1B holds (config.json with
llama3 rope scaling in the hub's transformers-4.45 spelling, generation_config.json, HF-named
safetensors, tokenizer.json / tokenizer_config.json / special_tokens_map.json, original/tokenizer.model
and original/params.json), at any size. Nothing is downloaded: the BPE vocabulary is torchtune's
2,000-rank test file shipped in `ssi/assets`, or a synthetic one of any size.
"""

from __future__ import annotations

import base64
import math
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from torchtune.models.llama3._tokenizer import CL100K_PATTERN

from ssi.files import write_json
from ssi.hf_dir import SAFETENSORS_INDEX, SAFETENSORS_SINGLE, TIKTOKEN_FILE
from ssi.model.tensor_files import save_tensors

HUB_TRANSFORMERS_VERSION = "4.45.0.dev0"
# How published Llama 3 tokenizers name their 256 special tokens (fixtures only: ssi itself reads the table
# from a base model's files). The names up to the first of the numbered reserved tokens, then the number of
# that first reserved token.
SPECIAL_NAMINGS: dict[str, tuple[tuple[str, ...], int]] = {
    # Meta-Llama-3 (3.0)
    "3.0": (
        ("<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
         "<|reserved_special_token_2|>", "<|reserved_special_token_3|>", "<|start_header_id|>", "<|end_header_id|>",
         "<|reserved_special_token_4|>", "<|eot_id|>"),
        5,
    ),
    # Llama 3.1, 3.2 and 3.3 on the hub
    "3.1": (
        ("<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
         "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
         "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"),
        3,
    ),
    # the llama-models tables (and torchtune's), as in Llama 3.2 Vision
    "llama-models": (
        ("<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
         "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
         "<|eot_id|>", "<|python_tag|>"),
        2,
    ),
}  # fmt: skip
# A Llama 3 style chat template for Instruct fixtures (the extension must keep it verbatim).
CHAT_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"
)


def special_tokens(n_bpe: int, naming: str = "3.1") -> dict[str, int]:
    """The 256 special tokens of a published Llama 3 naming, numbered from the size of the BPE file."""
    named, first_reserved = SPECIAL_NAMINGS[naming]
    reserved = [f"<|reserved_special_token_{first_reserved + k}|>" for k in range(256 - len(named))]
    return {name: n_bpe + offset for offset, name in enumerate([*named, *reserved])}


def small_tiktoken_file() -> Path:
    """torchtune's 2,000-rank tiktoken test vocabulary (BSD-3), shipped with the package."""
    return Path(str(resources.files("ssi") / "assets" / "tiktoken_small.model"))


def read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    ranks = {}
    for line in Path(path).read_bytes().splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def write_tiktoken_file(path: Path, ranks: dict[bytes, int]) -> None:
    lines = (base64.b64encode(t) + b" " + str(r).encode() for t, r in sorted(ranks.items(), key=lambda x: x[1]))
    path.write_bytes(b"\n".join(lines) + b"\n")


def synthetic_bpe_ranks(n_bpe: int) -> dict[bytes, int]:
    """A valid BPE vocabulary of exactly `n_bpe` ranks (>= 256): the 256 bytes, then merges of earlier tokens."""
    if n_bpe < 256:
        raise ValueError("a byte-level BPE vocabulary needs at least the 256 single bytes")
    tokens = [bytes([b]) for b in range(256)]
    seen = set(tokens)
    gen = torch.Generator().manual_seed(n_bpe)
    while len(tokens) < n_bpe:
        left, right = torch.randint(0, len(tokens), (2,), generator=gen).tolist()
        merged = tokens[left] + tokens[right]
        if merged not in seen and len(merged) <= 16:
            seen.add(merged)
            tokens.append(merged)
    return {t: i for i, t in enumerate(tokens)}


def _byte_to_unicode() -> dict[int, str]:
    """The byte-level alphabet of GPT-2-style BPE: printable bytes map to themselves, others above U+0100."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    mapping, shift = {}, 0
    for b in range(256):
        if b in keep:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(0x100 + shift)
            shift += 1
    return mapping


def hf_tokenizer_from_ranks(ranks: dict[bytes, int], naming: str = "3.1") -> Tokenizer:
    """The Llama 3 HF fast tokenizer for a tiktoken vocabulary: same pre-tokenizer regex, merges
    ordered by the rank of the merged token (the order in which tiktoken applies them)."""
    alphabet = _byte_to_unicode()

    def to_str(token: bytes) -> str:
        return "".join(alphabet[b] for b in token)

    vocab = {to_str(t): r for t, r in ranks.items()}
    merges = []
    for token in sorted(ranks, key=ranks.__getitem__):
        splits = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        for left, right in sorted(splits, key=lambda s: (ranks[s[0]], ranks[s[1]])):
            merges.append((to_str(left), to_str(right)))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CL100K_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    specials = special_tokens(len(ranks), naming)
    tokenizer.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    bos = "<|begin_of_text|>"
    tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{bos}:0 $A:0",
                pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                special_tokens=[(bos, specials[bos])],
            ),
        ]
    )
    return tokenizer


@dataclass(frozen=True)
class LlamaShape:
    """Sizes of a Llama 3.x model; defaults give a tiny model vLLM's CPU backend accepts (head_dim 32)."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 2
    num_kv_heads: int = 1
    ffn_dim_multiplier: float = 1.5
    multiple_of: int = 32
    tie_word_embeddings: bool = True
    rope_theta: float = 500000.0
    max_position_embeddings: int = 131072
    rope_factor: float | None = 32.0  # Llama 3 rope scaling factor (3.2: 32, 3.1: 8); None: plain RoPE (3.0)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def intermediate_size(self) -> int:
        """Meta's FFN sizing rule, so original/params.json and config.json agree."""
        hidden = int(self.ffn_dim_multiplier * int(2 * 4 * self.hidden_size / 3))
        return self.multiple_of * math.ceil(hidden / self.multiple_of)


LLAMA_3_2_1B = LlamaShape(
    hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8, multiple_of=256, ffn_dim_multiplier=1.5
)


def llama_state_dict(
    shape: LlamaShape, vocab_size: int, dtype: torch.dtype, seed: int = 0, std: float = 0.02
) -> dict[str, torch.Tensor]:
    """Random weights under HF key names (no lm_head when embeddings are tied, as on the hub)."""
    gen = torch.Generator().manual_seed(seed)
    h, kv = shape.hidden_size, shape.num_kv_heads * shape.head_dim

    def normal(*size: int) -> torch.Tensor:
        return (torch.randn(*size, generator=gen) * std).to(dtype)

    sd = {"model.embed_tokens.weight": normal(vocab_size, h)}
    for i in range(shape.num_layers):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = torch.ones(h, dtype=dtype)
        sd[p + "self_attn.q_proj.weight"] = normal(h, h)
        sd[p + "self_attn.k_proj.weight"] = normal(kv, h)
        sd[p + "self_attn.v_proj.weight"] = normal(kv, h)
        sd[p + "self_attn.o_proj.weight"] = normal(h, h)
        sd[p + "post_attention_layernorm.weight"] = torch.ones(h, dtype=dtype)
        sd[p + "mlp.gate_proj.weight"] = normal(shape.intermediate_size, h)
        sd[p + "mlp.up_proj.weight"] = normal(shape.intermediate_size, h)
        sd[p + "mlp.down_proj.weight"] = normal(h, shape.intermediate_size)
    sd["model.norm.weight"] = torch.ones(h, dtype=dtype)
    if not shape.tie_word_embeddings:
        sd["lm_head.weight"] = normal(vocab_size, h)
    return sd


def hub_config(shape: LlamaShape, n_bpe: int, dtype: torch.dtype, eos_token_id: int | list[int] | None = None) -> dict:
    """config.json as the hub publishes it for Llama 3.x (rope_scaling / torch_dtype spellings)."""
    rope_scaling = None
    if shape.rope_factor is not None:
        rope_scaling = {
            "factor": shape.rope_factor,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        }
    return {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": n_bpe,
        "eos_token_id": n_bpe + 1 if eos_token_id is None else eos_token_id,
        "head_dim": shape.head_dim,
        "hidden_act": "silu",
        "hidden_size": shape.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": shape.intermediate_size,
        "max_position_embeddings": shape.max_position_embeddings,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": shape.num_heads,
        "num_hidden_layers": shape.num_layers,
        "num_key_value_heads": shape.num_kv_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": rope_scaling,
        "rope_theta": shape.rope_theta,
        "tie_word_embeddings": shape.tie_word_embeddings,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "transformers_version": HUB_TRANSFORMERS_VERSION,
        "use_cache": True,
        "vocab_size": n_bpe + 256,
    }


def write_tokenizer_files(
    model_dir: Path,
    ranks: dict[bytes, int],
    tiktoken_source: Path | None = None,
    naming: str = "3.1",
    instruct: bool = False,
) -> None:
    """tokenizer.json, tokenizer_config.json, special_tokens_map.json and original/tokenizer.model, with the
    special tokens of `naming`; Instruct tokenizers carry a chat template and end turns with <|eot_id|>."""
    (model_dir / "original").mkdir(parents=True, exist_ok=True)
    if tiktoken_source is not None:
        shutil.copyfile(tiktoken_source, model_dir / TIKTOKEN_FILE)
    else:
        write_tiktoken_file(model_dir / TIKTOKEN_FILE, ranks)
    hf_tokenizer_from_ranks(ranks, naming).save(str(model_dir / "tokenizer.json"))
    specials = special_tokens(len(ranks), naming)
    flags = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
    config = {
        "added_tokens_decoder": {str(i): {"content": s, **flags} for s, i in specials.items()},
        "bos_token": "<|begin_of_text|>",
        "clean_up_tokenization_spaces": True,
        "eos_token": "<|eot_id|>" if instruct else "<|end_of_text|>",
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 131072,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    if instruct:
        config["chat_template"] = CHAT_TEMPLATE
    write_json(model_dir / "tokenizer_config.json", config)
    entry = {k: v for k, v in flags.items() if k != "special"}
    write_json(
        model_dir / "special_tokens_map.json",
        {
            "bos_token": {"content": "<|begin_of_text|>", **entry},
            "eos_token": {"content": "<|end_of_text|>", **entry},
        },
    )


def write_llama_dir(
    model_dir: str | Path,
    shape: LlamaShape = LlamaShape(),
    dtype: torch.dtype = torch.float32,
    n_bpe: int | None = None,
    seed: int = 0,
    std: float = 0.02,
    shard_tensors: int | None = None,
    naming: str = "3.1",
    instruct: bool = False,
) -> Path:
    """Write a Llama-3.x-shaped HF directory like a hub snapshot (random weights).

    `n_bpe=None` uses the shipped 2,000-rank tiktoken vocabulary; any other size builds a synthetic
    one. `shard_tensors=k` splits weights into shards of k tensors with an index, like larger
    hub checkpoints. `naming` picks the special-token names of a release (`SPECIAL_NAMINGS`); `instruct`
    adds the chat template and ends generation on the end-of-turn tokens, as Instruct checkpoints do.
    """
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    source = small_tiktoken_file() if n_bpe is None else None
    ranks = read_tiktoken_ranks(source) if source else synthetic_bpe_ranks(n_bpe)
    n_bpe = len(ranks)
    write_tokenizer_files(model_dir, ranks, source, naming, instruct)
    specials = special_tokens(n_bpe, naming)
    stops = [specials[name] for name in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>") if name in specials]
    config = hub_config(shape, n_bpe, dtype, eos_token_id=stops if instruct else None)
    write_json(model_dir / "config.json", config)
    write_json(
        model_dir / "generation_config.json",
        {
            "_from_model_config": True,
            "bos_token_id": n_bpe,
            "do_sample": True,
            "eos_token_id": stops if instruct else n_bpe + 1,
            "temperature": 0.6,
            "top_p": 0.9,
            "transformers_version": HUB_TRANSFORMERS_VERSION,
        },
    )
    write_json(
        model_dir / "original" / "params.json",
        {
            "dim": shape.hidden_size,
            "ffn_dim_multiplier": shape.ffn_dim_multiplier,
            "multiple_of": shape.multiple_of,
            "n_heads": shape.num_heads,
            "n_kv_heads": shape.num_kv_heads,
            "n_layers": shape.num_layers,
            "norm_eps": 1e-05,
            "rope_theta": shape.rope_theta,
            "use_scaled_rope": shape.rope_factor is not None,
            "vocab_size": config["vocab_size"],
        },
    )
    state = llama_state_dict(shape, config["vocab_size"], dtype, seed=seed, std=std)
    if shard_tensors is None:
        save_tensors(model_dir / SAFETENSORS_SINGLE, state)
        return model_dir
    names = list(state)
    groups = [names[i : i + shard_tensors] for i in range(0, len(names), shard_tensors)]
    weight_map, total = {}, 0
    for k, group in enumerate(groups, start=1):
        shard = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        save_tensors(model_dir / shard, {n: state[n] for n in group})
        weight_map.update(dict.fromkeys(group, shard))
        total += sum(state[n].nbytes for n in group)
    write_json(model_dir / SAFETENSORS_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return model_dir
