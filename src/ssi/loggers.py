"""Where metrics go: the run's own disk log always, TensorBoard and Weights & Biases when enabled.

Training logs there at every logged step; evaluation logs a checkpoint's scores there at the
checkpoint's step. TensorBoard and W&B are optional extras (`pip install -e '.[tensorboard]'`, `'.[wandb]'`):
enabling one whose package is missing is refused before any work, naming the extra.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from torchtune.training import metric_logging

from ssi import run_dir

# metric_logger.<name> -> (the package it needs, the extra that installs it)
OPTIONAL_LOGGERS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}


class LoggerUnavailableError(ValueError):
    """A logger that is enabled but whose package is not installed."""


def check_available(logger_cfg: Any) -> None:
    """Raise, naming the extra, for each enabled logger whose package is missing."""
    for name, (package, extra) in OPTIONAL_LOGGERS.items():
        if logger_cfg[name].enabled and importlib.util.find_spec(package) is None:
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
        loggers.append(metric_logging.TensorBoardLogger(log_dir=str(log_dir / "tensorboard"), organize_logs=False))
    if logger_cfg.wandb.enabled:
        resume = {"id": resume_wandb, "resume": "allow"} if resume_wandb else {}
        loggers.append(
            metric_logging.WandBLogger(
                project=logger_cfg.wandb.project,
                entity=logger_cfg.wandb.entity,
                name=logger_cfg.wandb.name,
                log_dir=str(run),
                **resume,
            )
        )
    return loggers
