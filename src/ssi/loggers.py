"""Where metrics go: the run's own disk log always, TensorBoard and Weights & Biases when enabled.

Training logs there at every logged step; evaluation (`log_evaluation`) adds a checkpoint's scores (WER,
benchmark accuracies) to the same TensorBoard directory and W&B run, at the checkpoint's step, reading
from the run's config which loggers were on and from `logs/wandb_run.json` which W&B run it was.
TensorBoard and W&B are optional extras (`pip install -e '.[tensorboard]'`, `'.[wandb]'`): enabling one
whose package is missing is refused before any work, naming the extra.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from torchtune.training import metric_logging

from ssi import run_dir
from ssi.files import FileFormatError, atomic_write_json, read_json

log = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"  # under <run>/logs
WANDB_RUN_FILE = "wandb_run.json"  # under <run>/logs: the W&B run that training logged to (id, project, entity)

# metric_logger.<name> -> (the package it needs, the extra that installs it)
OPTIONAL_LOGGERS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}


class LoggerUnavailableError(ValueError):
    """A logger that is enabled but whose package is not installed."""


def installed(package: str) -> bool:
    """Whether `package` can be imported (a `None` entry in sys.modules, Python's way to block one, counts as not)."""
    try:
        return importlib.util.find_spec(package) is not None
    except ValueError:  # sys.modules[package] is None: find_spec refuses instead of answering
        return False


def check_available(logger_cfg: Any) -> None:
    """Raise, naming the extra, for each enabled logger whose package is missing."""
    for name, (package, extra) in OPTIONAL_LOGGERS.items():
        if logger_cfg[name].enabled and not installed(package):
            raise LoggerUnavailableError(
                f"metric_logger.{name}.enabled=true needs the {package} package: pip install -e '.[{extra}]'"
            )


def build_loggers(logger_cfg: Any, run: Path, *, resume_wandb: str | None = None) -> list[Any]:
    """The run's metric loggers: disk (`<run>/logs`), then TensorBoard and W&B as enabled. `resume_wandb`
    (a W&B run id) appends to that run instead of starting a new one."""
    check_available(logger_cfg)
    log_dir = Path(run) / run_dir.LOGS_DIR
    loggers: list[Any] = [metric_logging.DiskLogger(log_dir=str(log_dir))]
    if logger_cfg.tensorboard.enabled:
        loggers.append(metric_logging.TensorBoardLogger(log_dir=str(log_dir / TENSORBOARD_DIR), organize_logs=False))
    if logger_cfg.wandb.enabled:
        resume = {"id": resume_wandb, "resume": "allow"} if resume_wandb else {}
        wandb_logger = metric_logging.WandBLogger(
            project=logger_cfg.wandb.project,
            entity=logger_cfg.wandb.entity,
            name=logger_cfg.wandb.name,
            log_dir=str(run),
            **resume,
        )
        loggers.append(wandb_logger)
        _record_wandb_run(log_dir, wandb_logger)
    return loggers


def _record_wandb_run(log_dir: Path, wandb_logger: Any) -> None:
    """Keep the W&B run's id where evaluation finds it, so later scores join the training curves."""
    current = wandb_logger._wandb.run  # torchtune keeps the module; `run` is None off rank 0
    if current is not None:
        record = {"id": current.id, "project": current.project, "entity": current.entity, "name": current.name}
        atomic_write_json(log_dir / WANDB_RUN_FILE, record, overwrite=True)


def log_evaluation(run: Path, step: int, metrics: Mapping[str, float]) -> list[str]:
    """Add evaluation `metrics` to the TensorBoard directory and the W&B run that training of `run` wrote,
    at the checkpoint's `step`; returns the loggers written to. A run that logged to neither gets nothing;
    a logger that cannot be reached now is reported as a warning (the scores are already on disk)."""
    config = Path(run) / run_dir.CONFIG_FILE
    logger_cfg = OmegaConf.load(config).get("metric_logger") if config.is_file() else None
    if logger_cfg is None:
        return []
    written = []
    for name, open_logger in (("tensorboard", _tensorboard_logger), ("wandb", _wandb_logger)):
        if not logger_cfg.get(name, {}).get("enabled", False):
            continue
        package, extra = OPTIONAL_LOGGERS[name]
        if not installed(package):
            log.warning(
                "run %s logged to %s, but %s is not installed here: pip install -e '.[%s]'", run, name, package, extra
            )
            continue
        try:
            logger = open_logger(Path(run), logger_cfg)
        except Exception as err:  # an optional side channel: W&B raises its own types (network, credentials)
            log.warning("could not log evaluation metrics to %s for run %s: %s", name, run, err)
            continue
        try:
            logger.log_dict(dict(metrics), step=step)
        finally:
            logger.close()
        written.append(name)
    if written:
        log.info("logged %s at step %d to %s", ", ".join(sorted(metrics)), step, " and ".join(written))
    return written


def _tensorboard_logger(run: Path, _cfg: Any) -> Any:
    return metric_logging.TensorBoardLogger(log_dir=str(run / run_dir.LOGS_DIR / TENSORBOARD_DIR), organize_logs=False)


def _wandb_logger(run: Path, cfg: Any) -> Any:
    try:
        recorded = read_json(run / run_dir.LOGS_DIR / WANDB_RUN_FILE)
    except FileFormatError as err:
        raise ValueError(f"{err} (written by training since W&B runs are recorded there)") from None
    return metric_logging.WandBLogger(
        project=recorded.get("project") or cfg.wandb.project,
        entity=recorded.get("entity") or cfg.wandb.entity,
        log_dir=str(run),
        id=recorded["id"],
        resume="allow",
    )
