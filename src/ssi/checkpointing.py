"""Llama 3.x models built from HF directories, and the checkpointer that reads and writes those directories.

Training runs on torchtune's `TransformerDecoder`, but every checkpoint must stay a complete HF model
directory (design.md sections 2 and 3) that transformers and vLLM load as is. So:

- `build_model` reads config.json and builds the matching torchtune model with torchtune's own
  Llama 3.2 component builder, at any size, refusing configs the builder cannot represent instead of
  silently training a different network.
- `SpeechCheckpointer` follows torchtune's checkpointer interface (`load_checkpoint()` returns
  {"model": torchtune state dict, ...}; `save_checkpoint(state_dict, epoch, step=...)`), converting
  weights with torchtune's `hf_to_tune` / `tune_to_hf` one tensor at a time, so saving needs no
  second copy of the model. Each save is written atomically to
  `<output_dir>/checkpoints/epoch_<E>/global_step_<S>/` with the tokenizer files, configs and the
  `ssi.json` manifest, plus a `training_state/` folder for exact resume.
- `resolve_checkpoint`, `list_checkpoints`, `prune_checkpoints` and `load_training_state` serve
  `resume_from_checkpoint=<dir|latest>` and `keep_last_n`.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors import safe_open
from torchtune.models import convert_weights
from torchtune.models.llama3_1._position_embeddings import Llama3ScaledRoPE
from torchtune.models.llama3_2._component_builders import llama3_2
from torchtune.modules import RotaryPositionalEmbeddings, TransformerDecoder
from tqdm import tqdm

from ssi.hf_dir import (
    SAFETENSORS_INDEX,
    SAFETENSORS_SINGLE,
    TIKTOKEN_FILE,
    TOKENIZER_FILES,
    ModelDirError,
    atomic_output_dir,
    config_dtype,
    config_rope_scaling,
    dtype_name,
    read_llama_config,
    read_safetensors_header,
    weight_files,
    write_json,
    write_safetensors,
)
from ssi.tokens import MANIFEST_NAME, SpeechVocab, VocabError

log = logging.getLogger(__name__)

MODEL_KEY = "model"  # torchtune.training.MODEL_KEY: the model weights inside a checkpoint dict
CHECKPOINTS_DIR = "checkpoints"
TRAINING_STATE_DIR = "training_state"
TRAINING_STATE_FILE = "training_state.pt"
DEFAULT_MAX_SHARD_SIZE = 5 * 10**9  # bytes per safetensors file, as the hub's Llama checkpoints use
# Files every checkpoint must carry besides weights, so that transformers, vLLM and torchtune all load it.
REQUIRED_SIDE_FILES = ("config.json", "generation_config.json", *TOKENIZER_FILES, TIKTOKEN_FILE, MANIFEST_NAME)
# Weight formats that would be stale next to freshly written safetensors (e.g. original/consolidated.00.pth).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
_EPOCH_RE = re.compile(r"^epoch_(\d+)$")
_STEP_RE = re.compile(r"^global_step_(\d+)$")
# Hidden names of a checkpoint being written (ssi.hf_dir.atomic_output_dir) or deleted, by process id.
_LEFTOVER_RE = re.compile(r"^\.global_step_\d+\.(partial|deleting)-(\d+)$")
_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}
# low_freq_factor, high_freq_factor and original context that torchtune's llama3_2 builder hard-codes.
_BUILDER_ROPE = (1.0, 4.0, 8192)
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


class CheckpointError(ValueError):
    """A model directory, config or checkpoint that cannot be loaded or written as asked."""


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """`bf16` / `fp32` / `fp16` (or their torch names) as a torch dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise CheckpointError(f"unsupported checkpoint dtype {dtype} (expected bf16, fp16 or fp32)")
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise CheckpointError(f"unsupported checkpoint dtype {dtype!r} (expected one of {sorted(_DTYPES)})")
    return _DTYPES[key]


def parse_size(size: int | str) -> int:
    """A byte count given as an int or as text like `5GB`, `500MB`, `2GiB` (HF's max_shard_size spelling)."""
    if isinstance(size, int):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)?\s*", str(size), flags=re.IGNORECASE)
        if not match:
            raise CheckpointError(f"max_shard_size {size!r} is not a size (examples: 5GB, 500MB, 2GiB, 1000000)")
        value = int(float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "").upper()])
    if value <= 0:
        raise CheckpointError(f"max_shard_size must be positive, got {size!r}")
    return value


# --- architecture ------------------------------------------------------------------------------------


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
    return LlamaArchitecture.from_config(_read_config(model_dir), source=str(model_dir / "config.json"))


def _read_config(model_dir: Path) -> dict[str, Any]:
    try:
        return read_llama_config(model_dir)
    except ModelDirError as err:
        raise CheckpointError(str(err)) from None


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


# --- weights on disk ----------------------------------------------------------------------------------


def _index_weights(model_dir: Path, arch: LlamaArchitecture) -> dict[str, Path]:
    """HF tensor name -> safetensors file, for every tensor the model needs, checked against config.json
    from the safetensors headers alone (no weight is read). Tied checkpoints that also store
    lm_head.weight are accepted; the copy is ignored, as transformers does."""
    try:
        files = weight_files(model_dir)
    except ModelDirError as err:
        raise CheckpointError(str(err)) from None
    expected = arch.hf_weight_shapes()
    found: dict[str, Path] = {}
    unexpected = []
    for path in files:
        try:
            entries, _ = read_safetensors_header(path)
        except ModelDirError as err:
            raise CheckpointError(str(err)) from None
        for entry in entries:
            if entry.name.endswith("rotary_emb.inv_freq") or (
                arch.tie_word_embeddings and entry.name == "lm_head.weight"
            ):
                continue
            if entry.name not in expected:
                unexpected.append(f"{entry.name} ({path.name})")
                continue
            if entry.name in found:
                raise CheckpointError(
                    f"{model_dir}: tensor {entry.name} is stored twice ({found[entry.name].name}, {path.name})"
                )
            if entry.shape != expected[entry.name]:
                raise CheckpointError(
                    f"{path}: {entry.name} has shape {list(entry.shape)}, but config.json implies "
                    f"{list(expected[entry.name])}"
                )
            found[entry.name] = path
    missing = [name for name in expected if name not in found]
    if missing:
        shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        raise CheckpointError(
            f"{model_dir}: missing weights {shown} (expected by config.json: {arch.num_layers} layers, "
            f"tie_word_embeddings={arch.tie_word_embeddings})"
        )
    if unexpected:
        raise CheckpointError(f"{model_dir}: unexpected tensors for a Llama model: {', '.join(unexpected[:6])}")
    return found


def _check_complete(ckpt_dir: Path) -> list[str]:
    """What a model directory lacks to be a complete checkpoint (empty list: complete)."""
    missing = [f for f in REQUIRED_SIDE_FILES if not (ckpt_dir / f).is_file()]
    if not (ckpt_dir / SAFETENSORS_SINGLE).is_file() and not (ckpt_dir / SAFETENSORS_INDEX).is_file():
        missing.append(f"{SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX}")
    return missing


def _side_files(model_dir: Path) -> dict[str, bytes]:
    """The non-weight files a checkpoint carries over from its source (configs, tokenizer files,
    manifest, licences): top-level files and original/, nothing nested deeper (no training_state/,
    no runs kept inside a model dir), no stale weights. Read once into memory (a few MB), so a
    source checkpoint may be pruned while training continues from it."""
    files: dict[str, bytes] = {}
    for folder in (model_dir, model_dir / "original"):
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            rel = path.relative_to(model_dir).as_posix()
            if (
                not path.is_file()
                or path.name.startswith(".")
                or path.suffix in _WEIGHT_SUFFIXES
                or rel == SAFETENSORS_INDEX
            ):
                continue
            files[rel] = path.read_bytes()
    return files


def _shard_plan(sizes: list[int], max_shard_size: int) -> list[list[int]]:
    """Consecutive groups of tensor indices, each at most `max_shard_size` bytes unless one tensor
    alone is larger (such a tensor gets a shard of its own, as transformers does)."""
    shards: list[list[int]] = [[]]
    current = 0
    for i, size in enumerate(sizes):
        if shards[-1] and current + size > max_shard_size:
            shards.append([])
            current = 0
        shards[-1].append(i)
        current += size
    return shards


def _tensor_writer(
    names: list[str], tensors: list[torch.Tensor], arch: LlamaArchitecture, dtype: torch.dtype, bar: tqdm
) -> Callable[[int, BinaryIO], None]:
    """Write tensor i in HF layout and `dtype`; conversion happens here, one tensor at a time."""

    def write(i: int, f: BinaryIO) -> None:
        hf = next(iter(arch.tune_to_hf({names[i]: tensors[i].detach()}).values()))
        out = hf.to(device="cpu", dtype=dtype).contiguous()
        f.write(memoryview(out.view(-1).view(torch.uint8).numpy()))
        bar.update(out.nbytes)

    return write


def _fsync_tree(root: Path) -> None:
    """Flush every file and directory under `root` to stable storage, so that once the directory is
    renamed into place a power loss or node crash cannot leave it with truncated contents."""
    for path in [*sorted(root.rglob("*"), reverse=True), root]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# --- the checkpointer -----------------------------------------------------------------------------------


class SpeechCheckpointer:
    """torchtune-style checkpointer for speech-extended HF Llama directories.

    `checkpoint_dir` is the model to start from: an extended base model (scripts/extend_llama3_2.py)
    or a checkpoint of an earlier run. It must be complete (config.json, generation_config.json,
    tokenizer files, original/tokenizer.model, ssi.json, weights) and its manifest must agree with
    config.json. Checkpoints are written under `<output_dir>/checkpoints/`. `dtype` selects the
    dtype of saved weights (default: the one config.json declares, i.e. the source's);
    `max_shard_size` splits larger checkpoints into indexed shards. With `should_load_recipe_state`,
    `load_checkpoint` also returns the checkpoint's training state (torchtune's flag name).
    """

    def __init__(
        self,
        checkpoint_dir: str | Path,
        output_dir: str | Path | None = None,
        *,
        dtype: str | torch.dtype | None = None,
        max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
        should_load_recipe_state: bool = False,
        progress: bool = True,
    ) -> None:
        self.checkpoint_dir = Path(checkpoint_dir)
        self.config = _read_config(self.checkpoint_dir)
        self.architecture = LlamaArchitecture.from_config(self.config, source=str(self.checkpoint_dir / "config.json"))
        missing = _check_complete(self.checkpoint_dir)
        if missing:
            hint = (
                " (not a speech-extended model: create one with scripts/extend_llama3_2.py)"
                if MANIFEST_NAME in missing
                else ""
            )
            raise CheckpointError(f"{self.checkpoint_dir} is incomplete: missing {', '.join(missing)}{hint}")
        try:
            self.vocab = SpeechVocab.load(self.checkpoint_dir)
        except VocabError as err:
            raise CheckpointError(str(err)) from None
        self.output_dir = Path(output_dir) if output_dir is not None else None
        if self.output_dir is not None:
            src, out = self.checkpoint_dir.resolve(), self.output_dir.resolve()
            if out == src or src in out.parents:
                raise CheckpointError(
                    f"output_dir {self.output_dir} is inside the model directory {self.checkpoint_dir}; "
                    "write runs elsewhere so the model directory stays a clean HF checkpoint"
                )
        try:
            self.source_dtype = config_dtype(self.config)
        except ModelDirError as err:
            raise CheckpointError(f"{self.checkpoint_dir / 'config.json'}: {err}") from None
        self.save_dtype = parse_dtype(dtype) if dtype is not None else self.source_dtype
        self.max_shard_size = parse_size(max_shard_size)
        self.should_load_recipe_state = should_load_recipe_state
        self.progress = progress
        self._weights = _index_weights(self.checkpoint_dir, self.architecture)
        self._tune_to_hf = self.architecture.tune_to_hf_names()
        self._side_files = _side_files(self.checkpoint_dir)

    # --- load ------------------------------------------------------------------------------------------
    def load_checkpoint(self) -> dict[str, Any]:
        """{"model": torchtune state dict in the file dtype} (+ the training state when
        `should_load_recipe_state`). Tensors are read and converted one at a time; most are
        copy-on-write memory maps of the files (no second copy of the model), so copy them into the
        model (`load_state_dict`, not `assign=True`) and drop the dict, which releases the files."""
        t0 = time.perf_counter()
        arch = self.architecture
        by_file: dict[Path, list[str]] = {}
        for name, path in self._weights.items():
            by_file.setdefault(path, []).append(name)
        total = sum(path.stat().st_size for path in by_file)
        state: dict[str, torch.Tensor] = {}
        with tqdm(total=total, unit="B", unit_scale=True, desc="loading checkpoint", disable=not self.progress) as bar:
            for path, names in by_file.items():
                with safe_open(path, framework="pt") as f:
                    for name in names:
                        state |= arch.hf_to_tune({name: f.get_tensor(name)})
                bar.update(path.stat().st_size)
        log.info(
            "loaded %s: %d tensors, %.2f GB in %.1fs (vocab %d, %d DSUs)",
            self.checkpoint_dir,
            len(state),
            sum(t.nbytes for t in state.values()) / 1e9,
            time.perf_counter() - t0,
            arch.vocab_size,
            self.vocab.n_dsus,
        )
        result: dict[str, Any] = {MODEL_KEY: state}
        if self.should_load_recipe_state:
            result |= load_training_state(self.checkpoint_dir)
        return result

    # --- save ------------------------------------------------------------------------------------------
    def checkpoint_path(self, epoch: int, step: int) -> Path:
        """`<output_dir>/checkpoints/epoch_<E>/global_step_<S>` (design.md section 3)."""
        if self.output_dir is None:
            raise CheckpointError("this checkpointer has no output_dir: it can load but not save")
        if epoch < 0 or step < 0:
            raise CheckpointError(f"epoch and step must be >= 0, got epoch={epoch}, step={step}")
        return self.output_dir / CHECKPOINTS_DIR / f"epoch_{epoch}" / f"global_step_{step}"

    def save_checkpoint(
        self,
        state_dict: dict[str, Any],
        epoch: int,
        *,
        step: int,
        training_state_writer: Callable[[Path], None] | None = None,
    ) -> Path:
        """Write a complete HF directory for `state_dict["model"]` (torchtune names, full tensors on
        any device) and return its path. Every other key of `state_dict` (optimizer, lr scheduler,
        RNG states, step counters...) goes to `training_state/training_state.pt`;
        `training_state_writer(dir)` may add files of its own (e.g. per-rank data-loader state) to
        that folder. Everything appears at once or not at all (files are flushed to disk before the
        directory is renamed into place); an existing checkpoint is never overwritten. The caller's
        dict is not modified.

        Distributed runs call this on one rank with gathered full tensors (e.g. torchtune's
        `gather_cpu_state_dict`, `get_full_optimizer_state_dict`); a full optimizer state also lets
        a run resume on a different number of ranks."""
        final = self.checkpoint_path(epoch, step)
        if MODEL_KEY not in state_dict:
            raise CheckpointError(f"save_checkpoint: state_dict has no {MODEL_KEY!r} entry (keys: {list(state_dict)})")
        if final.exists():
            raise CheckpointError(f"{final} already exists; checkpoints are never overwritten")
        names, tensors = self._ordered_model_tensors(state_dict[MODEL_KEY])
        extra = {k: v for k, v in state_dict.items() if k != MODEL_KEY}
        t0 = time.perf_counter()
        with atomic_output_dir(final) as tmp:
            self._write_side_files(tmp)
            nbytes, n_shards = self._write_weights(tmp, names, tensors)
            if extra or training_state_writer is not None:
                state_dir = tmp / TRAINING_STATE_DIR
                state_dir.mkdir()
                if extra:
                    torch.save(extra, state_dir / TRAINING_STATE_FILE)
                if training_state_writer is not None:
                    training_state_writer(state_dir)
            _fsync_tree(tmp)
        log.info(
            "saved %s: %.2f GB of %s weights in %d file(s)%s in %.1fs",
            final,
            nbytes / 1e9,
            dtype_name(self.save_dtype),
            n_shards,
            " + training state" if extra or training_state_writer else "",
            time.perf_counter() - t0,
        )
        return final

    def _ordered_model_tensors(self, model_state: dict[str, Any]) -> tuple[list[str], list[torch.Tensor]]:
        """torchtune names and tensors in HF file order, after checking names and shapes."""
        to_hf = self._tune_to_hf
        missing = [k for k in to_hf if k not in model_state]
        unexpected = [k for k in model_state if k not in to_hf]
        if missing or unexpected:
            raise CheckpointError(
                f"save_checkpoint: model state does not match {self.checkpoint_dir / 'config.json'}: "
                f"missing {missing[:6]}, unexpected {unexpected[:6]}"
            )
        shapes = self.architecture.hf_weight_shapes()
        for name, hf_name in to_hf.items():
            tensor = model_state[name]
            if not isinstance(tensor, torch.Tensor) or hasattr(tensor, "full_tensor"):
                raise CheckpointError(
                    f"save_checkpoint: {name} is a {type(tensor).__name__}; pass full tensors "
                    "(gather FSDP-sharded weights first, e.g. torchtune.training.gather_cpu_state_dict)"
                )
            if tuple(tensor.shape) != shapes[hf_name]:
                raise CheckpointError(
                    f"save_checkpoint: {name} has shape {list(tensor.shape)}, expected {list(shapes[hf_name])}"
                )
        return list(to_hf), [model_state[name] for name in to_hf]

    def _write_side_files(self, out: Path) -> None:
        for rel, data in self._side_files.items():
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            (out / rel).write_bytes(data)
        if self.save_dtype != self.source_dtype:
            config = dict(self.config)
            dtype_keys = [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]
            for key in dtype_keys:
                config[key] = str(self.save_dtype).removeprefix("torch.")
            write_json(out / "config.json", config)

    def _write_weights(self, out: Path, names: list[str], tensors: list[torch.Tensor]) -> tuple[int, int]:
        arch, dtype = self.architecture, self.save_dtype
        hf_names = [self._tune_to_hf[n] for n in names]
        sizes = [t.numel() * dtype.itemsize for t in tensors]
        shards = _shard_plan(sizes, self.max_shard_size)
        total = sum(sizes)
        with tqdm(total=total, unit="B", unit_scale=True, desc="saving checkpoint", disable=not self.progress) as bar:
            writer = _tensor_writer(names, tensors, arch, dtype, bar)
            weight_map = {}
            for k, group in enumerate(shards, start=1):
                filename = SAFETENSORS_SINGLE if len(shards) == 1 else f"model-{k:05d}-of-{len(shards):05d}.safetensors"
                layout = [(hf_names[i], dtype_name(dtype), tuple(tensors[i].shape)) for i in group]
                write_safetensors(out / filename, layout, lambda j, f, group=group: writer(group[j], f))
                weight_map |= {hf_names[i]: filename for i in group}
        if len(shards) > 1:
            write_json(out / SAFETENSORS_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
        return total, len(shards)


# --- run directories -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    epoch: int
    step: int


def list_checkpoints(output_dir: str | Path) -> list[CheckpointInfo]:
    """Complete checkpoints of a run, oldest first (by global step, then epoch). Partial writes
    live under hidden names and are never listed; a visible directory that lacks files (damaged by
    hand) is skipped with a warning."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    found = []
    if not root.is_dir():
        return found
    for epoch_dir in root.iterdir():
        epoch_match = _EPOCH_RE.match(epoch_dir.name)
        if not epoch_match or not epoch_dir.is_dir():
            continue
        for step_dir in epoch_dir.iterdir():
            step_match = _STEP_RE.match(step_dir.name)
            if not step_match or not step_dir.is_dir():
                continue
            missing = _check_complete(step_dir)
            if missing:
                log.warning("ignoring %s: missing %s", step_dir, ", ".join(missing))
                continue
            found.append(CheckpointInfo(step_dir, int(epoch_match.group(1)), int(step_match.group(1))))
    return sorted(found, key=lambda c: (c.step, c.epoch))


def resolve_checkpoint(output_dir: str | Path, spec: str | Path, missing_ok: bool = False) -> Path | None:
    """`resume_from_checkpoint`: "latest" (the run's newest complete checkpoint) or a checkpoint path.

    With `missing_ok`, "latest" in a run without checkpoints gives None instead of an error, so a
    requeued job script can always pass `latest` and its first start begins from scratch."""
    if str(spec) == "latest":
        checkpoints = list_checkpoints(output_dir)
        if checkpoints:
            return checkpoints[-1].path
        if missing_ok:
            return None
        raise CheckpointError(
            f"resume_from_checkpoint=latest: no complete checkpoint under {Path(output_dir) / CHECKPOINTS_DIR}"
        )
    path = Path(spec)
    if not path.is_dir():
        raise CheckpointError(f"resume_from_checkpoint: {path} is not a directory (give a checkpoint dir or 'latest')")
    missing = _check_complete(path)
    if missing:
        raise CheckpointError(
            f"resume_from_checkpoint: {path} is not a complete checkpoint: missing {', '.join(missing)}"
        )
    return path


def prune_checkpoints(output_dir: str | Path, keep_last_n: int) -> list[Path]:
    """Delete all but the newest `keep_last_n` checkpoints; returns the pruned paths. Each is first
    renamed to a hidden name, so a crash mid-delete never leaves a visible half-deleted checkpoint.

    Hidden leftovers of saves that another process started and never finished (a job killed
    mid-save) are removed too: call this only from the one process that writes the run's
    checkpoints (rank 0), never while another job writes into the same output_dir. A folder that
    cannot be deleted yet (on NFS, files still open elsewhere) is logged and retried at the next
    call: pruning never stops a training run."""
    if keep_last_n < 1:
        raise CheckpointError(f"keep_last_n must be >= 1, got {keep_last_n}")
    pruned = []
    for ckpt in list_checkpoints(output_dir)[:-keep_last_n]:
        ckpt.path.rename(ckpt.path.with_name(f".{ckpt.path.name}.deleting-{os.getpid()}"))
        pruned.append(ckpt.path)
        log.info("pruned %s (keep_last_n=%d)", ckpt.path, keep_last_n)
    root = Path(output_dir) / CHECKPOINTS_DIR
    epoch_dirs = [d for d in root.iterdir() if _EPOCH_RE.match(d.name) and d.is_dir()] if root.is_dir() else []
    for epoch_dir in epoch_dirs:
        for leftover in sorted(epoch_dir.iterdir()):
            match = _LEFTOVER_RE.match(leftover.name)
            if not match or (match.group(1) == "partial" and int(match.group(2)) == os.getpid()):
                continue  # not ours to delete, or a save of this very process
            if match.group(1) == "partial":
                log.warning("removing %s, left by an interrupted checkpoint save", leftover)
            try:
                shutil.rmtree(leftover)
            except OSError as err:
                log.warning("could not delete %s yet (%s); retrying at the next prune", leftover, err)
        if not any(epoch_dir.iterdir()):
            epoch_dir.rmdir()
    return pruned


def training_state_dir(ckpt_dir: str | Path) -> Path:
    """Where a checkpoint keeps its resume state (and whatever a `training_state_writer` added)."""
    return Path(ckpt_dir) / TRAINING_STATE_DIR


def load_training_state(ckpt_dir: str | Path, weights_only: bool = True) -> dict[str, Any]:
    """The non-model entries saved with a checkpoint (optimizer, scheduler, RNG, counters...), on CPU.

    `weights_only=True` (torch's safe loader) accepts tensors and plain Python containers/numbers;
    store e.g. numpy RNG state as a tensor or list, or pass `weights_only=False` for trusted files.
    Read eagerly, not memory-mapped: an optimizer keeps the tensors it is given, and a mapping would
    hold the file open for the whole run (on NFS that blocks pruning the checkpoint)."""
    path = training_state_dir(ckpt_dir) / TRAINING_STATE_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{ckpt_dir} has no {TRAINING_STATE_DIR}/{TRAINING_STATE_FILE}: it holds weights only and cannot "
            f"resume a run (start a new run from it with checkpointer.checkpoint_dir={ckpt_dir})"
        )
    return torch.load(path, map_location="cpu", weights_only=weights_only)
