"""The training core shared by the CPT and SFT recipes (recipes/cpt.py, recipes/sft.py).

Modelled on torchtune's recipes: one self-contained class with `setup / train / save_checkpoint /
cleanup`. What it adds for speech research:

- The model is built from the extended directory's config.json and loaded through
  `SpeechCheckpointer`, so every checkpoint is a complete HF directory plus `training_state/`.
- Loss normalisation is exact: each micro-batch contributes its summed token loss, and gradients are
  divided once per optimizer step by the number of label tokens of the whole accumulation window
  across all ranks (counted on the shifted labels the loss uses). A window without label tokens is
  skipped with a warning.
- Resume is exact: samples come from `GlobalBatchSampler` (a function of seed, epoch and step only),
  optimizer state is saved in full (world-size independent), and a run continues on any number of
  ranks with bit-identical losses on CPU fp32.
- SIGTERM/SIGUSR1 (Slurm's pre-timeout signal) end the run at the next step boundary with a checkpoint
  and exit code `EXIT_PREEMPTED`, so an sbatch script can requeue itself (snippets/).
"""

from __future__ import annotations

import logging
import os
import random
import signal
import sys
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save_file as save_safetensors
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.utils.data import DataLoader, DistributedSampler
from torchtune import modules, training
from torchtune.modules.loss import CEWithChunkedOutputLoss
from torchtune.training import metric_logging
from tqdm import tqdm

from ssi import distributed, flops, setup_cli_logging
from ssi.checkpointing import (
    MODEL_KEY,
    CheckpointError,
    SpeechCheckpointer,
    build_model,
    list_checkpoints,
    load_training_state,
    prune_checkpoints,
    resolve_checkpoint,
    training_state_dir,
)
from ssi.data import DataValidationError, TokenKinds, collate_padded
from ssi.data.collate import block_causal_mask
from ssi.data.config import build_dataloader, build_dataset, set_loader_epoch
from ssi.data.sources import SourceSpec
from ssi.data.text import TextDataset
from ssi.hf_dir import dtype_name
from ssi.loss import LinearCrossEntropyLoss
from ssi.sampling import GlobalBatchSampler
from ssi.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
EXIT_PREEMPTED = 99  # the run stopped on a signal after saving; requeue and resume from `latest`
CONFIG_FILE = "torchtune_config.yaml"
MASTER_WEIGHTS_FILE = "master_weights.safetensors"  # in training_state/: parameters in their training dtype
STATE_VERSION = 1
# Settings a resumed run must share with the run that wrote the checkpoint (unless force_resume=true).
RESUME_KEYS = (
    "data.kind",
    "data.train.dataset",
    "data.sequence",
    "data.packing",
    "optimizer",
    "lr_scheduler",
    "max_steps",
    "trainable",
    "seed",
    "dtype",
    "mixed_precision",
    "loss",
    "global_batch_size",
)


class RecipeError(ValueError):
    """A configuration the recipe refuses before training starts."""


def _select(cfg: DictConfig, key: str) -> Any:
    value = OmegaConf.select(cfg, key, throw_on_missing=False)
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) else value


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Labels aligned with the logits that predict them: position t is scored on token t+1."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


class SpeechTrainingRecipe:
    """Continued pre-training (`kind="cpt"`) or supervised fine-tuning (`kind="sft"`) of a speech-extended Llama."""

    def __init__(self, cfg: DictConfig, kind: str) -> None:
        self.cfg = cfg
        self.kind = kind
        try:
            OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        except MissingMandatoryValue as err:
            raise RecipeError(
                f"missing required setting {err.full_key}: pass {err.full_key}=... on the command line"
            ) from None
        if cfg.data.kind != kind:
            raise RecipeError(f"the {kind} recipe needs data={kind}/<preset>, got a {cfg.data.kind} preset")
        self.output_dir = Path(cfg.output_dir)
        self.grad_accum = int(cfg.gradient_accumulation_steps)
        self.max_steps = int(cfg.max_steps)
        if self.max_steps < 1 or self.grad_accum < 1:
            raise RecipeError("max_steps and gradient_accumulation_steps must be >= 1")
        self.device = torch.device("cpu")
        self.env = distributed.DistEnv()
        self.global_step = 0
        self.epoch = 0
        self.step_in_epoch = 0
        self.consumed_samples = 0
        self.totals = {"tokens": 0, "label_tokens": 0, "train_seconds": 0.0, "skipped_steps": 0}
        self._stop_signal = 0
        self._last_saved_step = -1
        self.metric_loggers: list[Any] = []

    # --- setup -----------------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        self.env = distributed.env_from_launcher()
        try:
            self.device = distributed.resolve_device(cfg.device, self.env.local_rank)
        except ValueError as err:
            raise RecipeError(str(err)) from None
        self.env = distributed.init_distributed(self.device, float(cfg.dist_timeout_s))
        self.dtype = training.get_dtype(cfg.dtype, self.device)  # what the forward and backward compute in
        # Parameters, gradients and AdamW states: fp32 master copies unless pure low precision was asked for
        # (bf16 parameters lose every update smaller than their spacing, e.g. all RMSNorm updates at lr 5e-5).
        self.param_dtype = torch.float32 if cfg.mixed_precision else self.dtype
        self.autocast = self.param_dtype != self.dtype and not self.env.is_distributed  # FSDP casts itself
        training.set_seed(int(cfg.seed))
        self.global_batch_size = int(cfg.data.train.dataloader.batch_size) * self.grad_accum * self.env.world_size

        resume_from = self._resolve_resume()
        source_dir = resume_from or Path(cfg.checkpointer.checkpoint_dir)
        if not source_dir.is_dir():
            raise RecipeError(f"checkpointer.checkpoint_dir {source_dir} is not a directory")
        try:
            self.checkpointer = SpeechCheckpointer(
                source_dir,
                self.output_dir,
                dtype=cfg.checkpointer.save_dtype,
                max_shard_size=cfg.checkpointer.max_shard_size,
                progress=bool(cfg.progress) and self.env.is_main,
            )
        except CheckpointError as err:
            raise RecipeError(str(err)) from None
        self.vocab = self.checkpointer.vocab
        self.tokenizer = load_tokenizer(source_dir)
        self._setup_data()
        self.model = self._setup_model(self._initial_weights(resume_from))
        self.optimizer = self._setup_optimizer()
        self.lr_scheduler = training.get_cosine_schedule_with_warmup(
            self.optimizer,
            num_warmup_steps=int(cfg.lr_scheduler.num_warmup_steps),
            num_training_steps=self.max_steps,
            num_cycles=float(cfg.lr_scheduler.num_cycles),
        )
        self._setup_loss()
        arch = self.checkpointer.architecture
        if cfg.compile:
            training.compile_model(self.model, verbose=self.env.is_main)
            if isinstance(self.loss_fn, LinearCrossEntropyLoss):
                self.loss_fn.compile_chunks()
            else:
                self.loss_fn = training.compile_loss(self.loss_fn, verbose=self.env.is_main)
        self.flops_per_token = partial(
            flops.training_flops_per_token,
            flops.matmul_params(
                arch.num_layers,
                arch.embed_dim,
                arch.num_heads,
                arch.num_kv_heads,
                arch.intermediate_dim,
                arch.vocab_size,
            ),
            arch.num_layers,
            arch.embed_dim,
        )
        self.peak_flops = flops.peak_flops(self.device, cfg.peak_tflops)
        if resume_from is not None:
            self._load_training_state(resume_from)
        if self.env.is_main:
            self._write_run_config()
            self._setup_metric_loggers()
        self._install_signal_handlers()

    def _initial_weights(self, resume_from: Path | None) -> dict[str, torch.Tensor]:
        """The weights to start from: a resumed run's full-precision master copy when its checkpoint kept
        one (the HF weights beside it are rounded to the saved dtype), else the model directory's."""
        master = training_state_dir(resume_from) / MASTER_WEIGHTS_FILE if resume_from is not None else None
        if master is not None and master.is_file():
            log.info("resuming from the %s master weights in %s", dtype_name(self.param_dtype), master)
            return load_safetensors(master)
        return self.checkpointer.load_checkpoint()[MODEL_KEY]

    def _resolve_resume(self) -> Path | None:
        spec = self.cfg.resume_from_checkpoint
        if spec is None:
            if list_checkpoints(self.output_dir):
                raise RecipeError(
                    f"{self.output_dir} already has checkpoints: pass resume_from_checkpoint=latest to continue "
                    "that run, or choose a new output_dir"
                )
            return None
        try:
            return resolve_checkpoint(self.output_dir, spec)
        except CheckpointError as err:
            raise RecipeError(str(err)) from None

    def _setup_data(self) -> None:
        cfg, env = self.cfg, self.env
        try:
            self.train_split = build_dataset(cfg.data, "train", self.tokenizer)
            self.dev_split = build_dataset(cfg.data, "dev", self.tokenizer) if cfg.data.get("dev") else None
        except DataValidationError as err:
            raise RecipeError(f"data: {err}") from None
        self.kinds = TokenKinds.from_vocab(self.vocab)
        loader_cfg = cfg.data.train.dataloader
        self.packed = bool(cfg.data.packing.enabled)
        pin_memory = self.device.type == "cuda"
        if self.packed:
            self.train_loader = build_dataloader(
                cfg.data,
                "train",
                self.train_split,
                self.tokenizer,
                rank=env.rank,
                world_size=env.world_size,
                pin_memory=pin_memory,
            )
            self.sampler = None
        else:
            self.sampler = GlobalBatchSampler(
                len(self.train_split.dataset),
                int(loader_cfg.batch_size),
                self.grad_accum,
                rank=env.rank,
                world_size=env.world_size,
                shuffle=bool(loader_cfg.get("shuffle", True)),
                seed=int(cfg.seed),
            )
            self.train_loader = DataLoader(
                self.train_split.dataset,
                batch_sampler=self.sampler,
                num_workers=int(loader_cfg.get("num_workers", 0)),
                collate_fn=partial(
                    collate_padded,
                    pad_id=self.tokenizer.pad_id,
                    kinds=self.kinds,
                    pad_to_multiple_of=int(loader_cfg.get("pad_to_multiple_of", 1)),
                    max_length=cfg.data.sequence.max_seq_len,
                ),
                pin_memory=pin_memory,
            )
        self.dev_loader = (
            build_dataloader(
                cfg.data,
                "dev",
                self.dev_split,
                self.tokenizer,
                rank=env.rank,
                world_size=env.world_size,
                pin_memory=pin_memory,
            )
            if self.dev_split is not None
            else None
        )
        self.text_dev_loader = self._text_dev_loader()
        if env.is_main:
            log.info(
                "data: %d train samples%s, global batch %d (%d x %d accumulation x %d ranks)%s",
                len(self.train_split.dataset),
                f", {len(self.dev_split.dataset)} dev samples" if self.dev_split else "",
                self.global_batch_size,
                int(loader_cfg.batch_size),
                self.grad_accum,
                env.world_size,
                ", packed" if self.packed else "",
            )

    def _text_dev_loader(self) -> DataLoader | None:
        """Plain-text dev set (`text_dev.source`) to watch forgetting of the base model's text ability."""
        text_cfg = self.cfg.text_dev
        if text_cfg.source is None:
            return None
        spec = SourceSpec(str(text_cfg.source), str(text_cfg.split), text_cfg.n_samples)
        try:
            dataset = TextDataset(spec, str(text_cfg.column), self.tokenizer, int(text_cfg.max_seq_len))
        except DataValidationError as err:
            raise RecipeError(str(err)) from None
        # every rank runs the same number of batches (FSDP needs matching forwards): the sampler pads
        sampler = DistributedSampler(dataset, self.env.world_size, self.env.rank, shuffle=False)
        collate = partial(collate_padded, pad_id=self.tokenizer.pad_id, kinds=self.kinds)
        return DataLoader(
            dataset,
            batch_size=int(text_cfg.batch_size),
            sampler=sampler,
            collate_fn=collate,
            pin_memory=self.device.type == "cuda",
        )

    def _setup_model(self, state_dict: dict[str, torch.Tensor]) -> modules.TransformerDecoder:
        cfg = self.cfg
        max_seq_len = cfg.data.sequence.max_seq_len
        if self.env.is_distributed:
            with training.set_default_dtype(self.param_dtype), torch.device("meta"):
                model = build_model(self.checkpointer.architecture, max_seq_len)
        else:
            with training.set_default_dtype(self.param_dtype), self.device:
                model = build_model(self.checkpointer.architecture, max_seq_len)
        if cfg.enable_activation_checkpointing:
            training.set_activation_checkpointing(model, auto_wrap_policy={modules.TransformerSelfAttentionLayer})
        if self.env.is_distributed:
            distributed.shard_model(
                model,
                modules.TransformerSelfAttentionLayer,
                compute_dtype=self.dtype if self.param_dtype != self.dtype else None,
            )
            training.load_from_full_model_state_dict(model, state_dict, self.device, strict=True)
            with self.device:
                for module in model.modules():
                    if hasattr(module, "rope_init"):
                        module.rope_init()
        else:
            model.load_state_dict(state_dict, strict=True)
        training.validate_expected_param_dtype(model.named_parameters(), dtype=self.param_dtype)
        self._set_trainable(model)
        return model

    def _set_trainable(self, model: modules.TransformerDecoder) -> None:
        """`full`: every parameter. `new_embeddings`: only the embedding (and untied output) rows added by
        extension. Before each optimizer step the base rows' gradients are zeroed (`_row_masks`); with no
        weight decay on them Adam leaves them bit-identical. The mask is applied to the gradient the
        optimizer sees, not through a hook: under FSDP2 a hook on the sharded parameter never runs (the
        gradient is computed for the unsharded one, then reduce-scattered)."""
        self._row_masks: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        mode = self.cfg.trainable
        if mode == "full":
            return
        if mode != "new_embeddings":
            raise RecipeError(f"trainable must be 'full' or 'new_embeddings', got {mode!r}")
        matrices = [model.tok_embeddings.weight]
        if isinstance(getattr(model, "output", None), torch.nn.Module):
            matrices.append(model.output.weight)
        for param in model.parameters():
            param.requires_grad_(False)
        first_new = self.vocab.base_vocab_size
        for param in matrices:
            param.requires_grad_(True)
            mask = torch.zeros(param.shape[0], 1, dtype=param.dtype, device=self.device)
            mask[first_new:] = 1
            if hasattr(param, "device_mesh"):  # FSDP2 DTensor: shard the row mask like the parameter's rows
                from torch.distributed.tensor import distribute_tensor

                mask = distribute_tensor(mask, param.device_mesh, param.placements)
            self._row_masks.append((param, mask))

    def _setup_loss(self) -> None:
        """`chunked`: torchtune's chunked cross-entropy over the model's logits. `linear`: the model stops
        at its final norm and the loss projects labelled positions chunk by chunk (`ssi.loss`)."""
        kind, chunks = self.cfg.loss.type, int(self.cfg.loss.num_output_chunks)
        if kind == "chunked":
            self.loss_fn = CEWithChunkedOutputLoss(num_output_chunks=chunks)
            self.model.set_num_output_chunks(chunks)
        elif kind == "linear":
            if self.env.is_distributed:
                raise RecipeError(
                    "loss.type=linear reads the output weight outside the model's forward, which FSDP keeps "
                    "sharded there: use loss.type=chunked with several ranks"
                )
            self.loss_fn = LinearCrossEntropyLoss(num_chunks=chunks, ignore_index=IGNORE_INDEX)
            norm = self.model.norm
            # an instance attribute shadows TransformerDecoder.unembed: forward now ends at the final norm
            self.model.unembed = lambda hidden: norm(hidden)
        else:
            raise RecipeError(f"loss.type must be 'chunked' or 'linear', got {kind!r}")

    def _output_weight(self) -> torch.Tensor:
        head = self.model.output
        return head.weight if isinstance(head, torch.nn.Module) else self.model.tok_embeddings.weight

    def _setup_optimizer(self) -> torch.optim.Optimizer:
        opt = self.cfg.optimizer
        params = [p for p in self.model.parameters() if p.requires_grad]
        fused = self.device.type == "cuda" if opt.fused == "auto" else bool(opt.fused)
        weight_decay = 0.0 if self.cfg.trainable == "new_embeddings" else float(opt.weight_decay)
        return torch.optim.AdamW(
            params,
            lr=float(opt.lr),
            betas=tuple(opt.betas),
            eps=float(opt.eps),
            weight_decay=weight_decay,
            fused=fused,
        )

    def _setup_metric_loggers(self) -> None:
        cfg = self.cfg.metric_logger
        self.metric_loggers = [metric_logging.DiskLogger(log_dir=str(self.output_dir / "logs"))]
        if cfg.tensorboard.enabled:
            self.metric_loggers.append(
                metric_logging.TensorBoardLogger(log_dir=str(self.output_dir / "logs" / "tensorboard"))
            )
        if cfg.wandb.enabled:
            self.metric_loggers.append(
                metric_logging.WandBLogger(
                    project=cfg.wandb.project,
                    entity=cfg.wandb.entity,
                    name=cfg.wandb.name,
                    log_dir=str(self.output_dir),
                )
            )
        for logger in self.metric_loggers:
            logger.log_config(self.cfg)

    def _write_run_config(self) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        resolved = OmegaConf.to_container(self.cfg, resolve=True)
        resolved["global_batch_size"] = self.global_batch_size
        resolved["world_size"] = self.env.world_size
        tmp = self.output_dir / f".{CONFIG_FILE}.tmp-{os.getpid()}"
        tmp.write_text(OmegaConf.to_yaml(OmegaConf.create(resolved)))
        tmp.rename(self.output_dir / CONFIG_FILE)

    # --- resume ----------------------------------------------------------------------------------------
    def _fingerprint(self) -> dict[str, Any]:
        return {
            key: (self.global_batch_size if key == "global_batch_size" else _select(self.cfg, key))
            for key in RESUME_KEYS
        }

    def _load_training_state(self, ckpt_dir: Path) -> None:
        state = load_training_state(ckpt_dir, weights_only=False)
        if state.get("version") != STATE_VERSION:
            raise RecipeError(f"{ckpt_dir}: training state version {state.get('version')} is not {STATE_VERSION}")
        changed = {
            k: (state["fingerprint"].get(k), v)
            for k, v in self._fingerprint().items()
            if state["fingerprint"].get(k) != v
        }
        if changed and not self.cfg.force_resume:
            lines = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
            raise RecipeError(
                f"resuming {ckpt_dir} with different settings ({lines}); pass force_resume=true to accept them"
            )
        if changed:
            log.warning("force_resume: continuing with changed settings %s", sorted(changed))
        set_optimizer_state_dict(
            self.model,
            self.optimizer,
            state["optimizer"],
            options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False),
        )
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.global_step = state["global_step"]
        self.epoch = state["epoch"]
        self.step_in_epoch = state["step_in_epoch"]
        self.consumed_samples = state["consumed_samples"]
        self.totals = state["totals"]
        rng = state["rng"]
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        self._last_saved_step = self.global_step
        if self.env.is_main:
            log.info(
                "resumed %s at step %d (epoch %d, step %d of it)",
                ckpt_dir,
                self.global_step,
                self.epoch,
                self.step_in_epoch,
            )

    # --- checkpoints -----------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path | None:
        """Write `checkpoints/epoch_E/global_step_S/` (HF weights + training_state) from rank 0."""
        if self._last_saved_step == self.global_step:
            return None
        if self.env.is_distributed:
            model_state = training.gather_cpu_state_dict(self.model, self.env.is_main, device=self.device)
        else:
            model_state = {k: v.detach() for k, v in self.model.state_dict().items()}
        optimizer_state = get_optimizer_state_dict(
            self.model, self.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        path = None
        if self.env.is_main:
            state = {
                MODEL_KEY: model_state,
                "version": STATE_VERSION,
                "optimizer": optimizer_state,
                "lr_scheduler": self.lr_scheduler.state_dict(),
                "global_step": self.global_step,
                "epoch": self.epoch,
                "step_in_epoch": self.step_in_epoch,
                "consumed_samples": self.consumed_samples,
                "totals": dict(self.totals),
                "fingerprint": self._fingerprint(),
                "world_size": self.env.world_size,
                "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
            }
            path = self.checkpointer.save_checkpoint(
                state, self.epoch, step=self.global_step, training_state_writer=self._master_weights_writer(model_state)
            )
            keep = self.cfg.checkpointer.keep_last_n
            if keep:
                prune_checkpoints(self.output_dir, int(keep))
        distributed.barrier(self.env)
        self._last_saved_step = self.global_step
        return path

    def _master_weights_writer(self, model_state: dict[str, torch.Tensor]) -> Callable[[Path], None] | None:
        """Parameters trained more precisely than the HF weights are saved (fp32 master weights of a bf16
        model) are kept in training_state/ too: otherwise every resume would round away the small updates
        they have accumulated."""
        if self.param_dtype.itemsize <= self.checkpointer.save_dtype.itemsize:
            return None

        def write(folder: Path) -> None:
            save_safetensors({k: v.contiguous() for k, v in model_state.items()}, str(folder / MASTER_WEIGHTS_FILE))

        return write

    # --- training --------------------------------------------------------------------------------------
    def _micro_batches(self) -> Iterator[dict[str, Any]]:
        """This rank's micro-batches for the rest of the current epoch."""
        if self.sampler is not None:
            self.sampler.set_epoch(self.epoch, self.step_in_epoch)
            self.train_split.dataset.set_epoch(self.epoch)
            yield from self.train_loader
            return
        set_loader_epoch(self.train_loader, self.epoch)
        batches = iter(self.train_loader)
        for _ in range(self.step_in_epoch * self.grad_accum):  # packed: replay to the resume point
            next(batches, None)
        # Ranks may hold different numbers of packs: the epoch ends for all when the first runs out.
        while True:
            batch = next(batches, None)
            if not self._all_ranks(batch is not None, distributed.all_reduce_min):
                return
            yield batch

    def _all_ranks(self, flag: bool, reduce: Any) -> bool:
        """`flag` combined over ranks by `reduce` (all_reduce_min: every rank; all_reduce_max: any rank)."""
        if not self.env.is_distributed:
            return flag
        return bool(reduce(torch.tensor([int(flag)], dtype=torch.int32, device=self.device), self.env).item())

    def _model_inputs(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        """Tokens and keyword inputs on the training device; a packed batch's document mask is built here,
        on the device, in the training process (never in a DataLoader worker)."""
        tokens = batch["tokens"].to(self.device, non_blocking=True)
        kwargs: dict[str, Any] = {}
        if "input_pos" in batch:
            kwargs["input_pos"] = batch["input_pos"].to(self.device, non_blocking=True)
        if "seq_lens" in batch:
            kwargs["mask"] = block_causal_mask(batch["seq_lens"], self.device)
        return tokens, kwargs

    def _forward_sum(self, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        """Summed token loss of one micro-batch and its number of label tokens (counted on the host copy
        of the labels: no device synchronisation)."""
        labels = shift_labels(batch["labels"])
        n_tokens = int((labels != IGNORE_INDEX).sum())
        labels = labels.to(self.device, non_blocking=True)
        tokens, kwargs = self._model_inputs(batch)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.autocast):
            outputs = self.model(tokens, **kwargs)
            if n_tokens == 0:  # a zero that keeps every parameter (and every rank) in the backward
                return sum(chunk.sum() for chunk in (outputs if isinstance(outputs, list) else [outputs])) * 0.0, 0
            if isinstance(self.loss_fn, LinearCrossEntropyLoss):
                return self.loss_fn(outputs, self._output_weight(), labels), n_tokens
            return self.loss_fn(outputs, labels) * n_tokens, n_tokens

    def train(self) -> int:
        """Run until max_steps (or a stop signal); returns the process exit code."""
        cfg, env = self.cfg, self.env
        log_steps, save_steps, eval_steps = int(cfg.log_steps), int(cfg.save_steps), int(cfg.eval_steps)
        bar = tqdm(
            total=self.max_steps,
            initial=self.global_step,
            desc=f"{self.kind} training",
            disable=not (env.is_main and cfg.progress),
            dynamic_ncols=True,
        )
        window: dict[str, Any] = self._new_window()
        t_window = time.perf_counter()
        max_epochs = cfg.get("epochs")
        while self.global_step < self.max_steps and not self._stop_signal:
            if max_epochs is not None and self.epoch >= int(max_epochs):
                break
            for micro, batch in enumerate(self._micro_batches(), start=1):
                loss_sum, n_tokens = self._forward_sum(batch)
                loss_sum.backward()
                window["loss_sum"] += loss_sum.detach().float()
                window["label_tokens"] += n_tokens
                window["samples"] += batch["tokens"].shape[0]
                counts = {kind: int(count) for kind, count in batch["token_counts"].items()}
                for kind, count in counts.items():
                    window["counts"][kind] += count
                real_tokens = counts["text"] + counts["dsu"] + counts["special"]
                window["model_flops"] += real_tokens * self.flops_per_token(batch["tokens"].shape[1])
                if micro % self.grad_accum:
                    continue
                metrics = self._optimizer_step(window)
                self.global_step += 1
                self.step_in_epoch += 1
                elapsed = time.perf_counter() - t_window
                self.totals["train_seconds"] += elapsed
                metrics.update(self._throughput(window, elapsed))
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}")
                if self.global_step % log_steps == 0 or self.global_step == 1:
                    self._log(metrics)
                if self.global_step % eval_steps == 0 and (losses := self.evaluate_all()):
                    self._log(losses)
                self._check_stop_signal()
                if self.global_step % save_steps == 0 or self._stop_signal or self.global_step >= self.max_steps:
                    self.save_checkpoint()
                window, t_window = self._new_window(), time.perf_counter()
                if self.global_step >= self.max_steps or self._stop_signal:
                    break
            else:
                if window["samples"]:  # packed epochs may end inside an accumulation window: drop it
                    self.optimizer.zero_grad(set_to_none=True)
                    window = self._new_window()
                self.epoch += 1
                self.step_in_epoch = 0
                continue
            break
        bar.close()
        self.save_checkpoint()
        if self._stop_signal:
            if env.is_main:
                log.warning(
                    "stopped by %s at step %d after saving: exiting with %d for requeue",
                    signal.Signals(self._stop_signal).name,
                    self.global_step,
                    EXIT_PREEMPTED,
                )
            return EXIT_PREEMPTED
        return 0

    def _new_window(self) -> dict[str, Any]:
        """Sums over one accumulation window; the loss stays on the training device until the step."""
        return {
            "loss_sum": torch.zeros((), dtype=torch.float32, device=self.device),
            "label_tokens": 0,
            "samples": 0,
            "model_flops": 0.0,
            "counts": {"text": 0, "dsu": 0, "special": 0, "padding": 0},
        }

    def _optimizer_step(self, window: dict[str, Any]) -> dict[str, Any]:
        """Normalise by the window's label tokens over all ranks, clip, step; returns step metrics."""
        totals = torch.stack(
            [torch.tensor(float(window["label_tokens"]), device=self.device), window["loss_sum"]]
        ).double()
        totals = distributed.all_reduce_sum(totals, self.env).cpu()
        label_tokens, loss_sum = int(totals[0]), float(totals[1])
        lr = self.optimizer.param_groups[0]["lr"]
        if label_tokens == 0:
            log.warning(
                "step %d: no label tokens in the accumulation window: skipping the update", self.global_step + 1
            )
            self.optimizer.zero_grad(set_to_none=True)
            self.totals["skipped_steps"] += 1
            return {"loss": float("nan"), "lr": lr, "grad_norm": float("nan"), "label_tokens": 0}
        for param, mask in self._row_masks:
            if param.grad is not None:
                param.grad.mul_(mask)
        # FSDP averages gradients over ranks; undo that and divide by the window's tokens.
        training.scale_grads(self.model, torch.tensor(self.env.world_size / label_tokens))
        grad_norm = float("nan")
        if self.cfg.clip_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm=float(self.cfg.clip_grad_norm))
            grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.lr_scheduler.step()
        self.totals["label_tokens"] += label_tokens
        return {"loss": loss_sum / label_tokens, "lr": lr, "grad_norm": grad_norm, "label_tokens": label_tokens}

    def _throughput(self, window: dict[str, Any], elapsed: float) -> dict[str, Any]:
        counts = torch.tensor(
            [window["samples"], *window["counts"].values(), window["model_flops"]], dtype=torch.float64
        )
        counts = distributed.all_reduce_sum(counts.to(self.device), self.env).cpu().tolist()
        samples, text, dsu, special, padding, model_flops = counts
        self.consumed_samples += int(samples)
        real_tokens = text + dsu + special
        self.totals["tokens"] += int(real_tokens)
        per_device_flops = model_flops / elapsed / self.env.world_size
        metrics = {
            "tokens_per_second": real_tokens / elapsed,
            "samples_per_second": samples / elapsed,
            "text_tokens": int(text),
            "dsu_tokens": int(dsu),
            "special_tokens": int(special),
            "padding_tokens": int(padding),
            "consumed_samples": self.consumed_samples,
            "epoch": self.epoch,
            "model_tflops_per_device": per_device_flops / 1e12,
        }
        if self.peak_flops is not None:
            metrics["mfu"] = per_device_flops / self.peak_flops
        if self.device.type == "cuda":
            metrics["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        else:
            import resource

            metrics["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        return metrics

    def evaluate_all(self) -> dict[str, float]:
        """`dev_loss` on the data preset's dev split and `text_dev_loss` on the text dev set, when configured."""
        losses = {}
        if self.dev_loader is not None:
            losses["dev_loss"] = self.evaluate()
        if self.text_dev_loader is not None:
            losses["text_dev_loss"] = self.evaluate(self.text_dev_loader)
        return losses

    @torch.no_grad()
    def evaluate(self, loader: DataLoader | None = None) -> float:
        """Token-weighted loss over a whole evaluation loader (default: the dev split), reduced across ranks.

        Ranks may hold different numbers of batches (packed evaluation): every rank keeps running
        forwards until the last one is done, repeating a batch with zero weight when it has none left,
        so that FSDP's collectives stay matched and every sample counts exactly once."""
        loader = loader or self.dev_loader
        assert loader is not None
        self.model.eval()
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        set_loader_epoch(loader, 0)
        batches = iter(loader)
        last = None
        while True:
            batch = next(batches, None)
            if not self._all_ranks(batch is not None, distributed.all_reduce_max):
                break
            if batch is None:  # this rank is done: a forward that counts for nothing
                batch = last if last is not None else self._empty_batch()
                self._forward_sum(batch)
                continue
            loss_sum, n_tokens = self._forward_sum(batch)
            totals += torch.stack([loss_sum.detach().double(), torch.tensor(float(n_tokens), device=self.device)])
            last = batch
        totals = distributed.all_reduce_sum(totals, self.env).cpu()
        self.model.train()
        return float(totals[0] / totals[1]) if totals[1] > 0 else float("nan")

    def _empty_batch(self) -> dict[str, Any]:
        """One padding token without a label, for a rank that has no evaluation batch at all."""
        return {
            "tokens": torch.tensor([[self.tokenizer.pad_id]]),
            "labels": torch.tensor([[IGNORE_INDEX]]),
        }

    def _log(self, metrics: dict[str, Any]) -> None:
        if not self.env.is_main:
            return
        for logger in self.metric_loggers:
            logger.log_dict(metrics, step=self.global_step)
        shown = {
            k: metrics[k]
            for k in ("loss", "dev_loss", "text_dev_loss", "lr", "grad_norm", "tokens_per_second")
            if k in metrics
        }
        eta = ""
        if "tokens_per_second" in metrics and self.global_step:
            per_step = self.totals["train_seconds"] / max(self.global_step, 1)
            eta = f" eta {time.strftime('%H:%M:%S', time.gmtime(per_step * (self.max_steps - self.global_step)))}"
        log.info("step %d %s%s", self.global_step, " ".join(f"{k}={v:.4g}" for k, v in shown.items()), eta)

    # --- preemption ------------------------------------------------------------------------------------
    def _install_signal_handlers(self) -> None:
        def request_stop(signum: int, _frame: Any) -> None:
            self._stop_signal = signum

        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, request_stop)

    def _check_stop_signal(self) -> None:
        """All ranks stop at the same step if any one of them was signalled."""
        flag = distributed.all_reduce_max(torch.tensor([self._stop_signal], device=self.device), self.env)
        self._stop_signal = int(flag.item())

    def cleanup(self) -> None:
        for logger in self.metric_loggers:
            logger.close()
        distributed.destroy(self.env)


def run_recipe(cfg: DictConfig, kind: str) -> int:
    """Entry point used by recipes/cpt.py and recipes/sft.py; returns the process exit code."""
    setup_cli_logging()
    try:
        recipe = SpeechTrainingRecipe(cfg, kind)
        recipe.setup()
    except (RecipeError, CheckpointError, DataValidationError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        return recipe.train()
    finally:
        recipe.cleanup()
