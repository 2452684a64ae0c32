"""The training recipe shared by CPT and SFT (recipes/cpt.py, recipes/sft.py).

One idea: the training loop of a speech-extended Llama, as one self-contained class in torchtune's recipe
shape (`setup / train / save_checkpoint / cleanup`); it is longer than most modules because the loop and
its set-up belong together. What it adds for speech research:

- The model is built from the extended directory's config.json and loaded through
  `SpeechCheckpointer`, so every checkpoint is a complete HF directory plus `training_state/`.
- Loss normalisation is exact: each micro-batch contributes its summed token loss, and gradients are
  divided once per optimizer step by the number of label tokens of the whole accumulation window
  across all ranks (counted on the shifted labels the loss uses). A window without label tokens is
  skipped with a warning.
- Resume is exact (`ssi.train.state`): samples come from `GlobalBatchSampler` (a function of seed,
  epoch and step only), optimizer state is saved in full (world-size independent), and a run continues
  on any number of ranks with bit-identical losses on CPU fp32.
- GPUs (docs/training.md): bf16 compute with fp32 master weights by default, FSDP2 across ranks,
  batches built on the host and copied without blocking, MFU in the logs.
- What a run trained on is counted the same way for both methods (`COUNTS`): text tokens, speech positions
  (unit tokens or audio slots) and seconds of audio, per step and in total (`consumed_*`, also logged at every
  checkpoint), summed over ranks and kept in the checkpoint, so a resume continues them.
- What is trained (`trainable=full | new_embeddings | lora | projector`, `freeze=`) is one object,
  `ssi.train.trainable`, that prepares the model and says what each checkpoint holds; how speech enters the
  decoder (`method=units | features`) is another, `ssi.model.methods`. The recipe has no branch per mode or method.
- SIGTERM, SIGUSR1 (Slurm's pre-timeout signal) and submitit's SIGUSR2 end the run at the next step boundary
  with a checkpoint; then submitit requeues the job, or the process exits with `EXIT_PREEMPTED` so an sbatch
  script can requeue itself (ssi.train.preemption). Budgets (`max_steps`, `max_tokens`, `max_hours`,
  `max_audio_hours`, `epochs`; ssi.train.budget) end it the same way with exit code 0.
  `resume_from_checkpoint=auto` continues a run that has a checkpoint and starts one that has none; in a Hydra
  multirun it is the default (ssi.train.sweep).
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.utils.data import DataLoader
from torchtune import modules, training
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX
from torchtune.modules.loss import CEWithChunkedOutputLoss
from tqdm import tqdm

from ssi import devices, loggers, report_error, run_dir, setup_cli_logging
from ssi.config import MissingSettingError, check_complete, model_dir_setting, to_container
from ssi.data import DataValidationError
from ssi.data.audio_sft import AudioSFTDataset
from ssi.data.collate import block_causal_mask
from ssi.data.config import build_dataset, data_input
from ssi.data.loaders import build_dataloader, set_loader_epoch, text_dataloader
from ssi.data.sources import SourceSpec
from ssi.data.text import TextDataset
from ssi.dtypes import DtypeError, parse_dtype, short_name
from ssi.files import append_jsonl, atomic_write_text
from ssi.model import methods
from ssi.model.architecture import CheckpointError
from ssi.model.builder import build_model
from ssi.model.checkpointer import MODEL_KEY, SpeechCheckpointer
from ssi.train import budget, distributed, state, sweep, trainable
from ssi.train.loss import LinearCrossEntropyLoss
from ssi.train.preemption import EXIT_PREEMPTED, StopSignals
from ssi.train.sampler import GlobalBatchSampler, SecondsBatchSampler
from ssi.train.throughput import AudioClock, Throughput, real_positions, speech_positions
from ssi.vocab.tiktoken import model_tokenizer

log = logging.getLogger(__name__)
# The totals that say what a run trained on, besides `tokens` (every non-padding position: max_tokens reads it).
COUNTS = ("text_tokens", "speech_positions", "audio_seconds")


class RecipeError(ValueError):
    """A configuration the recipe refuses before training starts."""


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Labels aligned with the logits that predict them: position t is scored on token t+1."""
    return F.pad(labels[:, 1:], (0, 1), value=CROSS_ENTROPY_IGNORE_IDX)


class SpeechTrainingRecipe:
    """Continued pre-training (`kind="cpt"`) or supervised fine-tuning (`kind="sft"`) of a speech-extended Llama."""

    def __init__(self, cfg: DictConfig, kind: str) -> None:
        self.cfg = cfg
        self.kind = kind
        try:
            model_dir_setting(cfg)
            check_complete(cfg)
        except MissingSettingError as err:
            raise RecipeError(str(err)) from None
        if cfg.data.kind != kind:
            raise RecipeError(f"the {kind} recipe needs data={kind}/<preset>, got a {cfg.data.kind} preset")
        self.method_name = str(cfg.get("method", "units"))
        try:
            methods.check_method(self.method_name, kind)
            reads = data_input(cfg.data)
        except (methods.MethodError, DataValidationError) as err:
            raise RecipeError(str(err)) from None
        wanted = methods.data_input(self.method_name)
        if reads != wanted:
            raise RecipeError(
                f"method={self.method_name} reads {wanted} presets, but this data preset holds {reads} "
                f"(data.input={reads}): pick a data=sft/<preset> of {wanted}"
            )
        self.output_dir = Path(cfg.output_dir)
        self.grad_accum = int(cfg.gradient_accumulation_steps)
        if self.grad_accum < 1:
            raise RecipeError("gradient_accumulation_steps must be >= 1")
        try:
            self.budget = budget.Budget.from_config(cfg)
            self.frozen_base = trainable.keeps_base_frozen(str(cfg.trainable))
        except (budget.BudgetError, trainable.TrainableError) as err:
            raise RecipeError(str(err)) from None
        self.max_steps = self.budget.max_steps
        self.stop_reason: str | None = None
        self.t_setup = time.monotonic()
        self.wall_before = 0.0  # wall-clock seconds of earlier attempts of this run (resumes, requeues)
        self.device = torch.device("cpu")
        self.env = distributed.DistEnv()
        self.global_step = 0
        self.epoch = 0
        self.step_in_epoch = 0
        self.consumed_samples = 0
        self.totals: dict[str, Any] = {"tokens": 0, "label_tokens": 0, "train_seconds": 0.0, "wall_seconds": 0.0}
        self.totals |= {"skipped_steps": 0, "text_tokens": 0, "speech_positions": 0, "audio_seconds": 0.0}
        self.stop = StopSignals()
        self._last_saved_step = -1
        self.metric_loggers: list[Any] = []

    # --- setup -----------------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        self.t_setup = time.monotonic()
        self.env = distributed.env_from_launcher()
        try:
            self.device = devices.resolve_device(cfg.device, self.env.local_rank)
            self.dtype = parse_dtype(cfg.dtype, "dtype")  # what the forward and backward compute in
        except (ValueError, DtypeError) as err:
            raise RecipeError(str(err)) from None
        if self.dtype == torch.bfloat16 and self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise RecipeError(f"dtype=bf16: {torch.cuda.get_device_name(self.device)} has no bf16 support; use fp32")
        self.env = distributed.init_distributed(self.device, float(cfg.dist_timeout_s))
        # Parameters, gradients and AdamW states: fp32 master copies unless pure low precision was asked for
        # (bf16 parameters lose every update smaller than their spacing, e.g. all RMSNorm updates at lr 5e-5).
        self.param_dtype = torch.float32 if cfg.mixed_precision else self.dtype
        self.autocast = self.param_dtype != self.dtype and not self.env.is_distributed  # FSDP casts itself
        training.set_seed(int(cfg.seed))
        self.global_batch_size = int(cfg.data.train.dataloader.batch_size) * self.grad_accum * self.env.world_size

        resume_from = self._resolve_resume()
        # a frozen base is read from model= again on resume: the checkpoint keeps only what was trained
        self._resolve_model(resume_from is not None and not self.frozen_base)
        source_dir = resume_from if resume_from is not None and not self.frozen_base else Path(cfg.model)
        if not source_dir.is_dir():
            raise RecipeError(f"model={source_dir} is not a directory{_size_preset_hint(str(cfg.model))}")
        try:
            self.checkpointer = SpeechCheckpointer(
                source_dir,
                self.output_dir,
                dtype=cfg.checkpointer.save_dtype,
                max_shard_size=cfg.checkpointer.max_shard_size,
                progress=bool(cfg.progress) and self.env.is_main,
                extended=methods.needs_extension(self.method_name),
            )
        except CheckpointError as err:
            raise RecipeError(str(err)) from None
        self.vocab = self.checkpointer.vocab
        arch = self.checkpointer.architecture
        try:
            self.method = methods.from_config(cfg, arch.embed_dim, self.dtype)
            first_new = self.vocab.base_vocab_size if self.vocab is not None else None
            self.trainable = trainable.from_config(cfg, arch, first_new, source_dir, self.method_name)
        except (methods.MethodError, trainable.TrainableError) as err:
            raise RecipeError(str(err)) from None
        self.tokenizer = model_tokenizer(source_dir, self.vocab)
        if self.env.is_main:
            try:
                loggers.check_available(cfg.metric_logger)
            except loggers.LoggerUnavailableError as err:
                raise RecipeError(str(err)) from None
        self._setup_data()
        self.clock = AudioClock.of_split(self.train_split)
        if not self.clock.measures:
            self.totals["audio_seconds"] = None
            if self.budget.max_audio_hours is not None:
                raise RecipeError(
                    "max_audio_hours: with data.sequence.dedup=true a unit token stands for a run of frames of "
                    "unknown length, so the audio seconds of a run are not counted; use max_tokens or dedup=false"
                )
        self.model = self._setup_model(self._initial_weights(resume_from))
        self.optimizer = self._setup_optimizer()
        try:
            self.lr_scheduler = budget.build_schedule(self.optimizer, cfg.lr_scheduler, self.budget)
        except budget.BudgetError as err:
            raise RecipeError(str(err)) from None
        self._setup_loss()
        if cfg.compile:
            training.compile_model(self.model, verbose=self.env.is_main)
            if isinstance(self.loss_fn, LinearCrossEntropyLoss):
                self.loss_fn.compile_chunks()
            else:
                self.loss_fn = training.compile_loss(self.loss_fn, verbose=self.env.is_main)
        self.throughput = Throughput.for_model(self.checkpointer.architecture, self.device, cfg.peak_tflops)
        if resume_from is not None:
            self._load_training_state(resume_from)
        if self.env.is_main:
            self.metric_loggers = loggers.build_loggers(cfg.metric_logger, self.output_dir)
            for logger in self.metric_loggers:
                logger.log_config(cfg)
            # after the loggers: torchtune's DiskLogger.log_config saves the unresolved config to the same file
            self._write_run_config()
        self.stop.install()

    def _initial_weights(self, resume_from: Path | None) -> dict[str, torch.Tensor]:
        """The weights to start from, in the prepared model's names: the checkpoint's (fp32 master weights
        when it kept them), or for a frozen base the base model's plus the tensors the checkpoint kept."""
        master = state.load_master_weights(resume_from) if resume_from is not None else None
        if master is not None:
            log.info("resuming from the %s master weights of %s", short_name(self.param_dtype), resume_from)
        weights = self.trainable.model_state(
            master if master is not None else self.checkpointer.load_checkpoint()[MODEL_KEY]
        )
        try:
            if resume_from is not None and self.frozen_base:
                weights |= state.load_kept_tensors(resume_from)
            # the method's own tensors continue from the resumed checkpoint, or from the model a stage starts from
            return self.method.model_state(weights, resume_from or Path(self.cfg.model))
        except (state.ResumeError, methods.MethodError) as err:
            raise RecipeError(str(err)) from None

    def _resolve_resume(self) -> Path | None:
        spec = self.cfg.resume_from_checkpoint
        try:
            if spec == "auto":
                return run_dir.resolve_checkpoint(self.output_dir, "latest", missing_ok=True)
            if spec is None:
                if run_dir.list_checkpoints(self.output_dir):
                    raise RecipeError(
                        f"{self.output_dir} already has checkpoints: pass resume_from_checkpoint=latest to continue "
                        "that run, or choose a new output_dir"
                    )
                return None
            return run_dir.resolve_checkpoint(self.output_dir, spec)
        except run_dir.RunDirError as err:
            raise RecipeError(str(err)) from None

    def _resolve_model(self, resuming: bool) -> None:
        """`model=<run directory>` starts from that finished run's final checkpoint, recorded as `model`."""
        try:
            start = run_dir.start_checkpoint(self.cfg.model)
        except run_dir.RunDirError as err:
            if resuming:  # the checkpoint being resumed holds the weights
                return
            raise RecipeError(str(err)) from None
        if start != Path(self.cfg.model):
            log.info("model=%s is a run directory: starting from its final checkpoint %s", self.cfg.model, start)
            self.cfg.model = str(start)

    def _setup_data(self) -> None:
        cfg, env = self.cfg, self.env
        slots = self.method.audio_slots
        try:
            self.train_split = build_dataset(cfg.data, "train", self.tokenizer, audio_slots=slots)
            self.dev_split = (
                build_dataset(cfg.data, "dev", self.tokenizer, audio_slots=slots) if cfg.data.get("dev") else None
            )
        except DataValidationError as err:
            raise RecipeError(f"data: {err}") from None
        loader_cfg = cfg.data.train.dataloader
        self.packed = bool(cfg.data.packing.enabled)
        ranks = {"rank": env.rank, "world_size": env.world_size, "pin_memory": self.device.type == "cuda"}
        self.sampler = None
        if not self.packed:  # padded batches follow the resumable, world-size independent order
            self.sampler = self._batch_sampler(loader_cfg)
        self.train_loader = build_dataloader(
            cfg.data, "train", self.train_split, self.tokenizer, batch_sampler=self.sampler, **ranks
        )
        self.dev_loader = (
            build_dataloader(cfg.data, "dev", self.dev_split, self.tokenizer, **ranks) if self.dev_split else None
        )
        self.text_dev_loader = self._text_dev_loader(ranks)
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

    def _batch_sampler(self, loader_cfg: DictConfig) -> GlobalBatchSampler | SecondsBatchSampler:
        """Micro-batches of `batch_size` samples, or of at most `batch_seconds` of audio (audio presets)."""
        env, dataset = self.env, self.train_split.dataset
        common = {"rank": env.rank, "world_size": env.world_size, "shuffle": bool(loader_cfg.get("shuffle", True))}
        by_seconds = loader_cfg.get("batch_seconds") is not None
        if by_seconds and not isinstance(dataset, AudioSFTDataset):
            raise RecipeError("data.train.dataloader.batch_seconds batches audio presets (data.input=audio)")
        try:
            if not by_seconds:
                return GlobalBatchSampler(
                    len(dataset), int(loader_cfg.batch_size), self.grad_accum, seed=int(self.cfg.seed), **common
                )
            return SecondsBatchSampler(
                dataset.durations,
                float(loader_cfg.batch_seconds),
                self.grad_accum,
                max_size=int(loader_cfg.batch_size),
                seed=int(self.cfg.seed),
                **common,
            )
        except ValueError as err:
            raise RecipeError(f"data: {err}") from None

    def _text_dev_loader(self, ranks: dict[str, Any]) -> DataLoader | None:
        """Plain-text dev set (`text_dev.source`) to watch forgetting of the base model's text ability."""
        text_cfg = self.cfg.text_dev
        if text_cfg.source is None:
            return None
        spec = SourceSpec(str(text_cfg.source), str(text_cfg.split), text_cfg.n_samples)
        try:
            dataset = TextDataset(spec, str(text_cfg.column), self.tokenizer, int(text_cfg.max_seq_len))
        except DataValidationError as err:
            raise RecipeError(str(err)) from None
        return text_dataloader(dataset, self.tokenizer, int(text_cfg.batch_size), **ranks)

    def _setup_model(self, state_dict: dict[str, torch.Tensor]) -> modules.TransformerDecoder:
        cfg = self.cfg
        max_seq_len = cfg.data.sequence.max_seq_len
        # Built without memory (meta), then allocated once in each tensor's final dtype: an 8B model built
        # in fp32 on the GPU would take 32 GB before its frozen weights are cast down to bf16.
        with training.set_default_dtype(self.param_dtype), torch.device("meta"):
            model = build_model(self.checkpointer.architecture, max_seq_len)
            self.trainable.prepare(model)
            self.method.attach(model)
        # frozen weights in the compute dtype when their file already holds them so (no master copy needed)
        lossless = self.checkpointer.source_dtype == self.dtype
        self.trainable.freeze(model, self.dtype if lossless else self.param_dtype, self.method.is_trained)
        if cfg.enable_activation_checkpointing:
            training.set_activation_checkpointing(model, auto_wrap_policy={modules.TransformerSelfAttentionLayer})
        if self.env.is_distributed:
            distributed.shard_model(
                model,
                modules.TransformerSelfAttentionLayer,
                compute_dtype=self.dtype if self.param_dtype != self.dtype else None,
            )
            training.load_from_full_model_state_dict(model, state_dict, self.device, strict=True)
        else:
            model.to_empty(device=self.device)
            model.load_state_dict(state_dict, strict=True)
        with self.device:  # the RoPE caches are buffers, not weights: computed again where they now live
            for module in model.modules():
                if hasattr(module, "rope_init"):
                    module.rope_init()
        trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        training.validate_expected_param_dtype(trained, dtype=self.param_dtype)
        if self.env.is_main:
            log.info("%s; %s", self.trainable.describe(model), self.method.describe())
        return model

    def _setup_loss(self) -> None:
        """`chunked`: torchtune's chunked cross-entropy over the model's logits. `linear`: the model stops
        at its final norm and the loss projects labelled positions chunk by chunk (`ssi.train.loss`)."""
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
            self.loss_fn = LinearCrossEntropyLoss(num_chunks=chunks, ignore_index=CROSS_ENTROPY_IGNORE_IDX)
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
        return torch.optim.AdamW(
            params,
            lr=float(opt.lr),
            betas=tuple(opt.betas),
            eps=float(opt.eps),
            weight_decay=float(opt.weight_decay),
            fused=fused,
        )

    def _write_run_config(self) -> None:
        resolved = to_container(self.cfg)
        resolved["global_batch_size"] = self.global_batch_size
        resolved["world_size"] = self.env.world_size
        yaml = OmegaConf.to_yaml(OmegaConf.create(resolved))
        atomic_write_text(self.output_dir / run_dir.CONFIG_FILE, yaml, overwrite=True)

    # --- resume ----------------------------------------------------------------------------------------
    def _load_training_state(self, ckpt_dir: Path) -> None:
        saved = run_dir.load_training_state(ckpt_dir, weights_only=False)
        try:
            state.check_resumable(
                saved, state.fingerprint(self.cfg, self.global_batch_size), ckpt_dir, bool(self.cfg.force_resume)
            )
            self.trainable.check_base(saved.get("base"), ckpt_dir)
        except (state.ResumeError, trainable.TrainableError) as err:
            raise RecipeError(str(err)) from None
        set_optimizer_state_dict(
            self.model,
            self.optimizer,
            saved["optimizer"],
            options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False),
        )
        self.lr_scheduler.load_state_dict(saved["lr_scheduler"])
        self.global_step = saved["global_step"]
        self.epoch = saved["epoch"]
        self.step_in_epoch = saved["step_in_epoch"]
        self.consumed_samples = saved["consumed_samples"]
        uncounted = [key for key in COUNTS if saved["totals"].get(key) is None and self.totals[key] is not None]
        if uncounted:
            log.warning("%s has no %s total (an older checkpoint): counted from here", ckpt_dir, ", ".join(uncounted))
        self.totals = {**self.totals, **{k: v for k, v in saved["totals"].items() if k not in uncounted}}
        self.wall_before = float(self.totals["wall_seconds"])
        state.restore_rng(saved["rng"])
        self._last_saved_step = self.global_step
        self._continue_schedule(saved.get("budget"))
        left = self.budget.exhausted(self.global_step, self.epoch, self.totals)
        if left is not None:
            why = f"{ckpt_dir} ended its run on {self.budget.describe(left)}"
            if self.cfg.resume_from_checkpoint != "auto":
                raise RecipeError(f"{why}: raise {left} to train further")
            log.info("%s: nothing left to train (raise %s to continue)", why, left)
            self.stop_reason = left
        if self.env.is_main:
            where = f"step {self.global_step} (epoch {self.epoch}, step {self.step_in_epoch} of it)"
            log.info("resumed %s at %s", ckpt_dir, where)

    def _continue_schedule(self, saved_budget: dict[str, Any] | None) -> None:
        """`lr_scheduler.span=budget` after a budget was changed: estimate the span again from the totals."""
        decided_at = budget.span_decision_step(self.cfg.lr_scheduler)
        unchanged = saved_budget is not None and budget.Budget.from_saved(saved_budget) == self.budget
        if decided_at is None or self.global_step < decided_at or unchanged:
            return
        self._decide_span()
        log.info("a budget changed: the lr schedule now spans %d steps", budget.schedule_of(self.lr_scheduler).span)

    def _decide_span(self) -> None:
        """Fix the cosine's length from the rates measured so far, the same on every rank (the smallest)."""
        span = self.budget.span_steps(self.global_step, self.totals)
        span = int(distributed.all_reduce(torch.tensor([span], device=self.device), self.env, "min").item())
        budget.schedule_of(self.lr_scheduler).span = span

    # --- checkpoints -----------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path | None:
        """Write `checkpoints/epoch_E/global_step_S/` (HF weights + training_state) from rank 0."""
        if self._last_saved_step == self.global_step:
            return None
        self._log(self._consumed())  # the report reads what each checkpoint was trained on from the log
        if self.env.is_distributed:
            model_state = training.gather_cpu_state_dict(self.model, self.env.is_main, device=self.device)
        else:
            model_state = {k: v.detach() for k, v in self.model.state_dict().items()}
        optimizer_state = get_optimizer_state_dict(
            self.model, self.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        path = None
        if self.env.is_main:
            decoder_state, own = self.method.split_state(model_state)
            merged = self.trainable.merged(decoder_state)
            checkpoint = {
                MODEL_KEY: merged,
                "version": state.STATE_VERSION,
                "optimizer": optimizer_state,
                "lr_scheduler": self.lr_scheduler.state_dict(),
                "global_step": self.global_step,
                "epoch": self.epoch,
                "step_in_epoch": self.step_in_epoch,
                "consumed_samples": self.consumed_samples,
                "totals": dict(self.totals),
                "fingerprint": state.fingerprint(self.cfg, self.global_batch_size),
                "world_size": self.env.world_size,
                "rng": state.rng_state(),
                "stop_reason": self.stop_reason,
                "budget": self.budget.as_dict(),
                "base": self.trainable.base_identity(),
            }
            kept = self.trainable.kept_tensors(decoder_state)
            writer = (
                state.kept_tensors_writer(kept)
                if kept is not None
                else state.master_weights_writer(merged, self.param_dtype, self.checkpointer.save_dtype)
            )

            def write_files(folder: Path) -> None:
                self.trainable.write_files(folder, decoder_state)
                self.method.write_files(folder, own)

            path = self.checkpointer.save_checkpoint(
                checkpoint, self.epoch, step=self.global_step, training_state_writer=writer, files_writer=write_files
            )
            keep = self.cfg.checkpointer.keep_last_n
            if keep:
                run_dir.prune_checkpoints(self.output_dir, int(keep))
        distributed.barrier(self.env)
        self._last_saved_step = self.global_step
        return path

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
            if not self._all_ranks(batch is not None, "min"):
                return
            yield batch

    def _all_ranks(self, flag: bool, op: str) -> bool:
        """`flag` combined over ranks: `min` (every rank) or `max` (any rank)."""
        if not self.env.is_distributed:
            return flag
        value = torch.tensor([int(flag)], dtype=torch.int32, device=self.device)
        return bool(distributed.all_reduce(value, self.env, op).item())

    def _model_inputs(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        """Tokens and keyword inputs on the training device; a packed batch's document mask is built here,
        on the device, in the training process (never in a DataLoader worker)."""
        tokens = self.method.decoder_inputs(batch, self.device)
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
        n_tokens = int((labels != CROSS_ENTROPY_IGNORE_IDX).sum())
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
        """Run until a budget or a stop signal ends it (ssi.train.budget); returns the process exit code."""
        cfg, env = self.cfg, self.env
        log_steps, save_steps, eval_steps = int(cfg.log_steps), int(cfg.save_steps), int(cfg.eval_steps)
        span_at = budget.span_decision_step(cfg.lr_scheduler)
        bar = tqdm(
            total=self.max_steps,
            initial=self.global_step,
            desc=f"{self.kind} training",
            disable=not (env.is_main and cfg.progress),
            dynamic_ncols=True,
        )
        window: dict[str, Any] = self._new_window()
        t_window = time.perf_counter()
        while self.stop_reason is None:
            if self.budget.epochs is not None and self.epoch >= self.budget.epochs:
                self.stop_reason = "epochs"
                break
            for micro, batch in enumerate(self._micro_batches(), start=1):
                loss_sum, n_tokens = self._forward_sum(batch)
                loss_sum.backward()
                self._accumulate(window, batch, loss_sum, n_tokens)
                if micro % self.grad_accum:
                    continue
                metrics = self._optimizer_step(window)
                self.global_step += 1
                self.step_in_epoch += 1
                elapsed = time.perf_counter() - t_window
                self.totals["train_seconds"] += elapsed
                metrics.update(self._throughput(window, elapsed))
                self.totals["wall_seconds"] = self.wall_before + time.monotonic() - self.t_setup
                if self.global_step == span_at:
                    self._decide_span()
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}")
                if self.global_step % log_steps == 0 or self.global_step == 1:
                    self._log(metrics)
                if self.global_step % eval_steps == 0 and (losses := self.evaluate_all()):
                    self._log(losses)
                self.stop_reason = self._stop_reason()
                if self.global_step % save_steps == 0 or self.stop_reason is not None:
                    self.save_checkpoint()
                window, t_window = self._new_window(), time.perf_counter()
                if self.stop_reason is not None:
                    break
            else:
                if window["counts"]["samples"]:  # packed epochs may end inside an accumulation window: drop it
                    self.optimizer.zero_grad(set_to_none=True)
                    window = self._new_window()
                self.epoch += 1
                self.step_in_epoch = 0
        bar.close()
        saved = self.save_checkpoint()
        self._record_stop(saved)
        return EXIT_PREEMPTED if self.stop_reason == "signal" else 0

    def _stop_reason(self) -> str | None:
        """Why training ends at this step boundary, the same on all ranks: a stop signal on any rank, else
        the first budget reached (each rank measures its own wall clock: the largest counts)."""
        reached = self.budget.reached(self.global_step, self.totals)
        code = (
            len(budget.STOP_REASONS) if self.stop.received else budget.STOP_REASONS.index(reached) + 1 if reached else 0
        )
        flags = torch.tensor([self.stop.received, code], device=self.device)
        self.stop.received, code = (int(v) for v in distributed.all_reduce(flags, self.env, "max").tolist())
        return budget.STOP_REASONS[code - 1] if code else None

    def _record_stop(self, saved: Path | None) -> None:
        """Say why the run stopped, in the log and in `logs/stops.jsonl` (the checkpoint's training state
        records it too when it was written at the stop)."""
        if not self.env.is_main or self.stop_reason is None:
            return
        reason = self.stop_reason
        if reason == "signal":
            what = f"{signal.Signals(self.stop.received).name}: preempted, resume to continue"
        else:
            what = f"{self.budget.describe(reason)} reached"
        log.info(
            "stopped at step %d (%s) after %s tokens (%s) and %.2f h%s",
            self.global_step,
            what,
            f"{self.totals['tokens']:,}",
            self._consumed_text(),
            self.totals["wall_seconds"] / 3600,
            f"; checkpoint {saved}" if saved else "",
        )
        audio = self.totals["audio_seconds"]
        record = {
            "reason": reason,
            "step": self.global_step,
            "epoch": self.epoch,
            "tokens": self.totals["tokens"],
            "text_tokens": self.totals["text_tokens"],
            "speech_positions": self.totals["speech_positions"],
            "audio_hours": None if audio is None else audio / 3600,
            "hours": self.totals["wall_seconds"] / 3600,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        if reason == "signal":
            record["signal"] = signal.Signals(self.stop.received).name
        append_jsonl(self.output_dir / run_dir.LOGS_DIR / run_dir.STOPS_FILE, record)

    def _new_window(self) -> dict[str, Any]:
        """Sums over one accumulation window; the loss stays on the training device until the step."""
        return {
            "loss_sum": torch.zeros((), dtype=torch.float32, device=self.device),
            "label_tokens": 0,
            "counts": dict.fromkeys(("samples", "text", "dsu", "special", "audio", "padding"), 0)
            | {"model_flops": 0.0, "audio_seconds": 0.0},
        }

    def _accumulate(self, window: dict[str, Any], batch: dict[str, Any], loss_sum: torch.Tensor, n: int) -> None:
        counts = window["counts"]
        window["loss_sum"] += loss_sum.detach().float()
        window["label_tokens"] += n
        counts["samples"] += batch["tokens"].shape[0]
        kinds = {kind: int(count) for kind, count in batch["token_counts"].items()}
        for kind, count in kinds.items():
            counts[kind] += count
        counts["model_flops"] += self.throughput.batch_flops(real_positions(kinds), batch["tokens"].shape[1])
        counts["audio_seconds"] += self.clock.seconds(batch)

    def _optimizer_step(self, window: dict[str, Any]) -> dict[str, Any]:
        """Normalise by the window's label tokens over all ranks, clip, step; returns step metrics."""
        totals = torch.stack(
            [torch.tensor(float(window["label_tokens"]), device=self.device), window["loss_sum"]]
        ).double()
        totals = distributed.all_reduce(totals, self.env).cpu()
        label_tokens, loss_sum = int(totals[0]), float(totals[1])
        lr = self.optimizer.param_groups[0]["lr"]
        if label_tokens == 0:
            log.warning(
                "step %d: no label tokens in the accumulation window: skipping the update", self.global_step + 1
            )
            self.optimizer.zero_grad(set_to_none=True)
            self.totals["skipped_steps"] += 1
            return {"loss": float("nan"), "lr": lr, "grad_norm": float("nan"), "label_tokens": 0}
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
        names = list(window["counts"])
        summed = torch.tensor([window["counts"][name] for name in names], dtype=torch.float64)
        counts = dict(zip(names, distributed.all_reduce(summed.to(self.device), self.env).cpu().tolist(), strict=True))
        self.consumed_samples += int(counts["samples"])
        self.totals["tokens"] += int(real_positions(counts))
        self.totals["text_tokens"] += int(counts["text"])
        self.totals["speech_positions"] += int(speech_positions(counts))
        metrics = self.throughput.metrics(counts, elapsed, self.env.world_size)
        if self.clock.measures:
            self.totals["audio_seconds"] += counts["audio_seconds"]
            metrics["audio_seconds"] = counts["audio_seconds"]
        return {**metrics, **self._consumed(), "epoch": self.epoch}

    def _consumed(self) -> dict[str, float]:
        """The running totals of what the run trained on, on all ranks (`consumed_<total>`)."""
        consumed = {"consumed_samples": self.consumed_samples}
        for key in ("tokens", *COUNTS):
            if self.totals[key] is not None:
                consumed[f"consumed_{key}"] = self.totals[key]
        return consumed

    def _consumed_text(self) -> str:
        """`1,200 text tokens, 3,400 speech positions, 0.12 h of audio` for the log."""
        t = self.totals
        audio = "" if t["audio_seconds"] is None else f", {t['audio_seconds'] / 3600:.4g} h of audio"
        return f"{t['text_tokens']:,} text tokens, {t['speech_positions']:,} speech positions{audio}"

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
            if not self._all_ranks(batch is not None, "max"):
                break
            if batch is None:  # this rank is done: a forward that counts for nothing
                self._forward_sum(last if last is not None else self._empty_batch())
                continue
            loss_sum, n_tokens = self._forward_sum(batch)
            totals += torch.stack([loss_sum.detach().double(), torch.tensor(float(n_tokens), device=self.device)])
            last = batch
        totals = distributed.all_reduce(totals, self.env).cpu()
        self.model.train()
        return float(totals[0] / totals[1]) if totals[1] > 0 else float("nan")

    def _empty_batch(self) -> dict[str, Any]:
        """One padding token without a label, for a rank that has no evaluation batch at all."""
        return {
            "tokens": torch.tensor([[self.tokenizer.pad_id]]),
            "labels": torch.tensor([[CROSS_ENTROPY_IGNORE_IDX]]),
        }

    def _log(self, metrics: dict[str, Any]) -> None:
        if not self.env.is_main:
            return
        for logger in self.metric_loggers:
            logger.log_dict(metrics, step=self.global_step)
        shown = {
            k: metrics[k]
            for k in ("loss", "dev_loss", "text_dev_loss", "lr", "grad_norm", "tokens_per_second", "mfu")
            if k in metrics
        }
        if not shown:  # the running totals logged with a checkpoint: for the metric logs only
            return
        eta = seen = ""
        if "tokens_per_second" in metrics and self.global_step:
            per_step = self.totals["train_seconds"] / self.global_step
            last = self.budget.span_steps(self.global_step, self.totals)
            eta = f" eta {time.strftime('%H:%M:%S', time.gmtime(per_step * max(last - self.global_step, 0)))}"
            seen = f" ({self._consumed_text()} so far)"
        log.info("step %d %s%s%s", self.global_step, " ".join(f"{k}={v:.4g}" for k, v in shown.items()), eta, seen)

    def cleanup(self) -> None:
        """Release what the run holds; in a local sweep the next job starts in this same process."""
        for logger in self.metric_loggers:
            logger.close()
        self.metric_loggers = []
        self.stop.restore()
        distributed.destroy(self.env)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _size_preset_hint(value: str) -> str:
    """A hint for `model=tiny` and the like: size presets are chosen with `size=` (conf/size/)."""
    presets = Path(__file__).resolve().parents[3] / "conf" / "size"
    if (presets / f"{value}.yaml").is_file():
        return f" (size presets are chosen with size={value}; model= names the model directory)"
    return ""


def run_recipe(cfg: DictConfig, kind: str) -> int:
    """Entry point used by recipes/cpt.py and recipes/sft.py; returns the process exit code (end it with
    `ssi.train.sweep.end_job`). After a stop checkpoint the signal goes on to the handler it interrupted
    (under submitit: requeue and exit)."""
    setup_cli_logging()
    recipe = None
    try:
        sweep.bind_job(cfg)
        recipe = SpeechTrainingRecipe(cfg, kind)
        recipe.setup()
        code = recipe.train()
    except (RecipeError, CheckpointError, DataValidationError, sweep.SweepError) as err:
        code = report_error(err)
    finally:
        if recipe is not None:
            recipe.cleanup()
    if code == EXIT_PREEMPTED and recipe is not None:
        recipe.stop.hand_over()
    return code
