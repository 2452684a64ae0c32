"""The checkpointer that reads and writes complete HF model directories for training. One idea: a training
checkpoint on disk, read and written as HF weights (including which of its weight files it can share with the
run's other checkpoints instead of writing them again).

Training runs on torchtune's `TransformerDecoder`, but every checkpoint must stay a complete HF model
directory (docs/run_directory.md) that transformers and vLLM load as is. `SpeechCheckpointer` follows
torchtune's checkpointer interface (`load_checkpoint()` returns {"model": torchtune state dict, ...};
`save_checkpoint(state_dict, epoch, step=...)`), converting weights with torchtune's `hf_to_tune` /
`tune_to_hf` one tensor at a time, so saving needs no second copy of the model. Each save is written
atomically to `<output_dir>/checkpoints/epoch_<E>/global_step_<S>/` with the tokenizer files, configs
and the `ssi.json` manifest, plus a `training_state/` folder for exact resume. Weights are written in
`save_dtype` (default: the source's), except a LoRA merge (`MergedWeights`), which keeps its own precision.

Tensors saved bit-identical to the source's (a frozen base: every LLM tensor with trainable=projector, all but
the embedding/output with new_embeddings) go to shard files of their own, which the run keeps once in
`<output_dir>/checkpoints/.frozen/` and every later checkpoint hard-links (a copy where linking fails), so a
checkpoint costs disk for what was trained only and still is a complete directory (docs/run_directory.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import mmap
import os
import re
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors import safe_open
from tqdm import tqdm

from ssi import run_dir
from ssi.dtypes import DtypeError, config_dtype, parse_dtype, short_name
from ssi.files import atomic_output_dir, write_json
from ssi.hf_dir import (
    MANIFEST_NAME,
    SAFETENSORS_INDEX,
    SAFETENSORS_SINGLE,
    ModelDirError,
    TensorEntry,
    missing_files,
    read_safetensors_header,
    weight_files,
    write_safetensors,
)
from ssi.model.architecture import CheckpointError, LlamaArchitecture, read_config
from ssi.model.tensor_files import dtype_name
from ssi.vocab.layout import SpeechVocab, VocabError

log = logging.getLogger(__name__)

MODEL_KEY = "model"  # torchtune.training.MODEL_KEY: the model weights inside a checkpoint dict
DEFAULT_MAX_SHARD_SIZE = 5 * 10**9  # bytes per safetensors file, as the hub's Llama checkpoints use
# Weight formats that would be stale next to freshly written safetensors (e.g. original/consolidated.00.pth).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
_COMPARE_CHUNK = 64 << 20  # bytes compared at a time against the source's file
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


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


class MergedWeights(dict[str, torch.Tensor]):
    """Model weights computed by a merge (LoRA: W + scale B A, in fp32), with the dtype that holds them. In the
    source's dtype (bf16 for a bf16 base) a delta below about 0.4% of a weight would round away, and every reader
    of the checkpoint would compute (nearly) the base model; so the checkpointer writes them in `dtype` unless
    `checkpointer.save_dtype` was set explicitly (docs/training.md)."""

    def __init__(self, weights: Mapping[str, torch.Tensor], dtype: torch.dtype) -> None:
        super().__init__(weights)
        self.dtype = dtype


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


def _file_id(path: Path) -> tuple[int, int, int, int]:
    """What tells a file apart from an edited or replaced one without reading it."""
    st = path.stat()
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _same_bytes(out: torch.Tensor, source: mmap.mmap, entry: TensorEntry) -> bool:
    """Whether the contiguous CPU tensor `out` holds exactly the bytes of `entry` in the mapped source file."""
    data = out.view(-1).view(torch.uint8).numpy()
    if data.nbytes != entry.nbytes:
        return False
    for offset in range(0, data.nbytes, _COMPARE_CHUNK):
        end = min(offset + _COMPARE_CHUNK, data.nbytes)
        if source[entry.start + offset : entry.start + end] != data[offset:end].tobytes():
            return False
    return True


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link `src` as `dst`; copy it where the filesystem refuses links (another device, no link support)."""
    try:
        os.link(src, dst)
    except OSError as err:
        log.info("cannot hard-link %s (%s): copying it into %s", src, err, dst.parent)
        shutil.copyfile(src, dst)


# --- the checkpointer -----------------------------------------------------------------------------------


class SpeechCheckpointer:
    """torchtune-style checkpointer for speech-extended HF Llama directories.

    `checkpoint_dir` is the model to start from: an extended base model (scripts/extend_llama3_2.py)
    or a checkpoint of an earlier run. It must be complete (config.json, generation_config.json,
    tokenizer files, original/tokenizer.model, ssi.json, weights) and its manifest must agree with
    config.json. Checkpoints are written under `<output_dir>/checkpoints/`. `dtype` selects the
    dtype of saved weights (default: the one config.json declares, i.e. the source's, or the precision a
    `MergedWeights` state asks for);
    `max_shard_size` splits larger checkpoints into indexed shards. With `should_load_recipe_state`,
    `load_checkpoint` also returns the checkpoint's training state (torchtune's flag name). With
    `extended=False` (the features method reads a base Llama) the manifest is optional: `vocab` is None
    without one.
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
        extended: bool = True,
    ) -> None:
        self.checkpoint_dir = Path(checkpoint_dir)
        self.config = read_config(self.checkpoint_dir)
        self.architecture = LlamaArchitecture.from_config(self.config, source=str(self.checkpoint_dir / "config.json"))
        missing = missing_files(self.checkpoint_dir)
        has_manifest = (self.checkpoint_dir / MANIFEST_NAME).is_file()
        if not extended and not has_manifest and MANIFEST_NAME in missing:
            missing.remove(MANIFEST_NAME)
        if missing:
            hint = (
                " (not a speech-extended model: create one with scripts/extend_llama3_2.py)"
                if MANIFEST_NAME in missing
                else ""
            )
            raise CheckpointError(f"{self.checkpoint_dir} is incomplete: missing {', '.join(missing)}{hint}")
        try:
            self.vocab = SpeechVocab.load(self.checkpoint_dir) if has_manifest else None
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
            self.source_dtype = config_dtype(self.config, str(self.checkpoint_dir / "config.json"))
            self.save_dtype = parse_dtype(dtype, "checkpointer.save_dtype") if dtype is not None else self.source_dtype
            self._save_dtype_chosen = dtype is not None
        except DtypeError as err:
            raise CheckpointError(str(err)) from None
        self.max_shard_size = parse_size(max_shard_size)
        self.should_load_recipe_state = should_load_recipe_state
        self.progress = progress
        self._weights = _index_weights(self.checkpoint_dir, self.architecture)
        self._entries = {
            entry.name: entry
            for path in set(self._weights.values())
            for entry in read_safetensors_header(path)[0]
            if self._weights.get(entry.name) == path
        }
        self._source_ids = {path: _file_id(path) for path in set(self._weights.values())}
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
            self.vocab.n_dsus if self.vocab is not None else 0,
        )
        result: dict[str, Any] = {MODEL_KEY: state}
        if self.should_load_recipe_state:
            result |= run_dir.load_training_state(self.checkpoint_dir)
        return result

    # --- save ------------------------------------------------------------------------------------------
    def checkpoint_path(self, epoch: int, step: int) -> Path:
        """`<output_dir>/checkpoints/epoch_<E>/global_step_<S>` (docs/run_directory.md)."""
        if self.output_dir is None:
            raise CheckpointError("this checkpointer has no output_dir: it can load but not save")
        if epoch < 0 or step < 0:
            raise CheckpointError(f"epoch and step must be >= 0, got epoch={epoch}, step={step}")
        return run_dir.checkpoint_dir(self.output_dir, epoch, step)

    def save_checkpoint(
        self,
        state_dict: dict[str, Any],
        epoch: int,
        *,
        step: int,
        training_state_writer: Callable[[Path], None] | None = None,
        files_writer: Callable[[Path], None] | None = None,
    ) -> Path:
        """Write a complete HF directory for `state_dict["model"]` (torchtune names, full tensors on
        any device) and return its path. Every other key of `state_dict` (optimizer, lr scheduler,
        RNG states, step counters...) goes to `training_state/training_state.pt`;
        `training_state_writer(dir)` may add files of its own (e.g. per-rank data-loader state) to
        that folder, and `files_writer(dir)` files of its own to the checkpoint (e.g. a LoRA adapter).
        Everything appears at once or not at all (files are flushed to disk before the
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
        dtype = self.weights_dtype(state_dict[MODEL_KEY])
        extra = {k: v for k, v in state_dict.items() if k != MODEL_KEY}
        t0 = time.perf_counter()
        with atomic_output_dir(final) as tmp:
            self._write_side_files(tmp, dtype)
            nbytes, n_shards, linked, new_copies = self._write_weights(tmp, names, tensors, dtype)
            if extra or training_state_writer is not None:
                state_dir = run_dir.training_state_dir(tmp)
                state_dir.mkdir()
                if extra:
                    torch.save(extra, state_dir / run_dir.TRAINING_STATE_FILE)
                if training_state_writer is not None:
                    training_state_writer(state_dir)
            if files_writer is not None:
                files_writer(tmp)
            _fsync_tree(tmp)
        self._share(final, new_copies)
        log.info(
            "saved %s: %.2f GB of %s weights in %d file(s), %.2f GB of them linked to the run's unchanged copy%s "
            "in %.1fs",
            final,
            nbytes / 1e9,
            dtype_name(dtype),
            n_shards,
            linked / 1e9,
            " + training state" if extra or training_state_writer else "",
            time.perf_counter() - t0,
        )
        return final

    def weights_dtype(self, model_state: Mapping[str, Any]) -> torch.dtype:
        """`save_dtype`, or the more precise dtype a merge needs (`MergedWeights`) when save_dtype is the default."""
        if not isinstance(model_state, MergedWeights):
            return self.save_dtype
        if torch.finfo(self.save_dtype).eps <= torch.finfo(model_state.dtype).eps:
            return self.save_dtype
        if self._save_dtype_chosen:
            log.warning(
                "checkpointer.save_dtype=%s: the merged LoRA weights lose every delta below about %.2g%% of a weight, "
                "so generation from this checkpoint may compute (nearly) the base model; adapter/ keeps the adapters",
                short_name(self.save_dtype),
                100 * torch.finfo(self.save_dtype).eps / 2,
            )
            return self.save_dtype
        return model_state.dtype

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

    def _write_side_files(self, out: Path, dtype: torch.dtype) -> None:
        for rel, data in self._side_files.items():
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            (out / rel).write_bytes(data)
        if dtype != self.source_dtype:
            config = dict(self.config)
            dtype_keys = [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]
            for key in dtype_keys:
                config[key] = str(dtype).removeprefix("torch.")
            write_json(out / "config.json", config)

    def _unchanged(
        self, names: list[str], tensors: list[torch.Tensor], dtype: torch.dtype, *, all_or_none: bool
    ) -> list[bool]:
        """Which tensors would be written bit-identical to the source's bytes (same dtype, same values); with
        `all_or_none` (one file, shared only whole) the first changed tensor ends the search. A source file
        edited, replaced or deleted since it was read (a pruned start checkpoint) shares nothing."""
        unchanged = [False] * len(names)
        try:
            if any(_file_id(path) != ident for path, ident in self._source_ids.items()):
                raise FileNotFoundError("changed since it was read")
            files = {path: open(path, "rb") for path in self._source_ids}  # noqa: SIM115 (closed below)
        except OSError as err:
            log.info("%s: not sharing unchanged weights with it (%s)", self.checkpoint_dir, err)
            return unchanged
        try:
            maps = {path: mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) for path, f in files.items()}
            for i, (name, tensor) in enumerate(zip(names, tensors, strict=True)):
                hf_name = self._tune_to_hf[name]
                entry = self._entries[hf_name]
                if entry.dtype == dtype_name(dtype):
                    hf = next(iter(self.architecture.tune_to_hf({name: tensor.detach()}).values()))
                    source = maps[self._weights[hf_name]]
                    first = hf[:1].to(device="cpu", dtype=dtype).contiguous()  # most trained tensors differ here
                    row = TensorEntry(hf_name, entry.dtype, tuple(first.shape), entry.start, entry.start + first.nbytes)
                    if _same_bytes(first, source, row):
                        unchanged[i] = _same_bytes(hf.to(device="cpu", dtype=dtype).contiguous(), source, entry)
                if all_or_none and not unchanged[i]:
                    break
            for m in maps.values():
                m.close()
        finally:
            for f in files.values():
                f.close()
        return unchanged

    def _store_path(self, layout: list[tuple[str, str, tuple[int, ...]]]) -> Path:
        """The run's copy of a shard of unchanged tensors: named by its layout and the identity of the source
        files its bytes equal, so a copy is reused only for the very same bytes."""
        sources = sorted({self._source_ids[self._weights[name]] for name, _, _ in layout})
        key = json.dumps({"layout": layout, "sources": sources}, separators=(",", ":")).encode()
        assert self.output_dir is not None
        return run_dir.frozen_weights_dir(self.output_dir) / f"{hashlib.sha256(key).hexdigest()[:32]}.safetensors"

    def _write_weights(
        self, out: Path, names: list[str], tensors: list[torch.Tensor], dtype: torch.dtype
    ) -> tuple[int, int, int, dict[str, Path]]:
        """Write the shards; those of unchanged tensors are linked from the run's copy when it exists. Returns the
        bytes of weights, the number of files, the bytes linked, and the shards the run has no copy of yet."""
        arch = self.architecture
        hf_names = [self._tune_to_hf[n] for n in names]
        sizes = [t.numel() * dtype.itemsize for t in tensors]
        plan = _shard_plan(sizes, self.max_shard_size)
        unchanged = self._unchanged(names, tensors, dtype, all_or_none=len(plan) == 1)
        if len(plan) > 1:  # sharded anyway: unchanged tensors get shards of their own (one file stays one file)
            groups = [[i for i in range(len(names)) if unchanged[i] == frozen] for frozen in (False, True)]
            plan = [
                [g[j] for j in s] for g in groups if g for s in _shard_plan([sizes[i] for i in g], self.max_shard_size)
            ]
        shards = [(group, all(unchanged[i] for i in group)) for group in plan]
        total = sum(sizes)
        linked = 0
        new_copies: dict[str, Path] = {}
        with tqdm(total=total, unit="B", unit_scale=True, desc="saving checkpoint", disable=not self.progress) as bar:
            writer = _tensor_writer(names, tensors, arch, dtype, bar)
            weight_map = {}
            for k, (group, frozen) in enumerate(shards, start=1):
                filename = SAFETENSORS_SINGLE if len(shards) == 1 else f"model-{k:05d}-of-{len(shards):05d}.safetensors"
                layout = [(hf_names[i], dtype_name(dtype), tuple(tensors[i].shape)) for i in group]
                weight_map |= {hf_names[i]: filename for i in group}
                store = self._store_path(layout) if frozen else None
                if store is not None and store.is_file():
                    _link_or_copy(store, out / filename)
                    linked += sum(sizes[i] for i in group)
                    bar.update(sum(sizes[i] for i in group))
                    continue
                write_safetensors(out / filename, layout, lambda j, f, group=group: writer(group[j], f))
                if store is not None:
                    new_copies[filename] = store
        if len(shards) > 1:
            write_json(out / SAFETENSORS_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
        return total, len(shards), linked, new_copies

    def _share(self, checkpoint: Path, new_copies: dict[str, Path]) -> None:
        """Keep the unchanged shards of a checkpoint now complete as the run's copy (a hard link, so pruning
        the checkpoint leaves it). Linked only once the checkpoint is in place: a failed save leaves no copy."""
        for filename, store in new_copies.items():
            store.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(checkpoint / filename, store)
            except FileExistsError:
                pass
            except OSError as err:
                log.info("cannot hard-link %s into %s (%s): later checkpoints write it again", filename, store, err)
                continue
            with contextlib.suppress(OSError):  # read-only: a write into one checkpoint's file would change them all
                os.chmod(store, 0o444)
