"""Hydra multiruns (`-m`) of the recipes: which run directory a sweep job owns, and how a job ends.

docs/experiments.md is the contract. Each job of a sweep is one cell of an experiment matrix:

- Its run directory is `<hydra.sweep.dir>/<cell name>` (conf/common.yaml: `hydra.sweep.subdir: ${ssi.cell:}`),
  and `output_dir` follows it. The cell name lists the job's values of the keys in `sweep.cell_keys`, sorted,
  as `key-value` joined by `+` (`data.sequence.dedup-true+seed-1`). `SweptKeysAreCells` sets `sweep.cell_keys`
  to the keys the command line sweeps (`key=a,b`, `range()`, `glob()`) when it is not given, so a CPT and an
  SFT sweep over the same cells name their runs alike; a multirun that sweeps nothing names its run by every
  override except the non-cell keys of `hydra.job.config.override_dirname.exclude_keys`.
  A name must survive being passed back on a Hydra command line (`model=<run>/checkpoints/...`), where `=`,
  `,` and `~` are syntax, so values are rewritten: a config-group choice keeps its name with `/` as `.`, a
  path becomes `<last component>@<6 hex digits of its hash>`, a list `[a,b]` becomes `a_b`, booleans are
  `true`/`false`, other characters outside `[A-Za-z0-9._+@-]` become `-`. A name longer than 200 characters
  is cut and ends with a hash of the whole.
- A job resumes its own run when it has a checkpoint (`resume_from_checkpoint=auto`): a job requeued after
  preemption and a sweep launched again continue where they stopped.
- A job never `sys.exit`s on success or failure: that would end a local sweep after its first job, and under
  submitit leave no result for the waiting driver. A failed job raises; Hydra marks it failed and the other
  jobs still run. A stop signal ends a local sweep (all jobs share one process); in a submitit job it fails
  the job after the checkpoint, unless submitit's own signal requeues it first (ssi.train.preemption).
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from pathlib import Path, PurePath
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import CompactHydraException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, read_write

from ssi import report_error
from ssi.train.preemption import EXIT_PREEMPTED

MAX_NAME_CHARS = 200
_UNSAFE = re.compile(r"[^A-Za-z0-9._+@-]+")
_BRACKETS = re.compile(r"[\[\]{}()'\" ]")


class SweepError(ValueError):
    """A multirun set-up that would put jobs into the wrong run directory."""


class SweepJobFailed(RuntimeError, CompactHydraException):
    """A sweep job that ended with a non-zero code; Hydra records it as failed and goes on with the others.

    A compact Hydra error: Hydra ends the sweep with this one line, not a traceback (the job's own error is
    already logged)."""


def in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def in_submitit_job() -> bool:
    """True inside a job that submitit started (one job per process); false under Hydra's basic launcher."""
    return "SUBMITIT_FOLDER" in os.environ


# --- cell names --------------------------------------------------------------------------------------------


def safe_value(value: str, group_choice: bool = False) -> str:
    """A value as it appears in a folder name (module docstring)."""
    if "/" in value and not group_choice:
        digest = hashlib.sha1(value.encode()).hexdigest()[:6]
        value = f"{PurePath(value.rstrip('/')).name or 'root'}@{digest}"
    value = _BRACKETS.sub("", value).replace(",", "_").replace("/", ".")
    return _UNSAFE.sub("-", value)


def cell_name(task_overrides: list[str], exclude_keys: list[str], cell_keys: list[str] | None, groups: set[str]) -> str:
    """The run-directory name of one sweep job from its task overrides (module docstring); "" for none.
    `groups` are the config groups (`data`, `size`): their values are choices, not paths."""
    items = []
    for override in OverridesParser.create().parse_overrides(task_overrides):
        key = override.key_or_group
        if (key in exclude_keys) if cell_keys is None else (key not in cell_keys):
            continue
        # Hydra escapes `\`, `:` and `${}` in the string form of a value; the name needs the value itself
        if override.is_delete():
            value = "deleted"
        elif isinstance(override.value(), bool):
            value = str(override.value()).lower()  # as YAML and the run's config write it
        else:
            value = override.get_value_element_as_str().replace("\\", "")
        items.append(f"{key}-{safe_value(value, key in groups)}")
    name = "+".join(sorted(items))
    if len(name) > MAX_NAME_CHARS:
        name = f"{name[: MAX_NAME_CHARS - 11]}@{hashlib.sha1(name.encode()).hexdigest()[:10]}"
    return name


def _resolve_cell(*, _root_: DictConfig) -> str:
    """`${ssi.cell:}`: this job's cell name; its job number when no override names it."""
    hydra_cfg = HydraConfig.get()
    cell_keys = OmegaConf.select(_root_, SweptKeysAreCells.CELL_KEYS, default=None)
    name = cell_name(
        list(hydra_cfg.overrides.task),
        list(hydra_cfg.job.config.override_dirname.exclude_keys),
        list(cell_keys) if cell_keys is not None else None,
        set(hydra_cfg.runtime.choices),
    )
    return name or str(hydra_cfg.job.num)


class SweptKeysAreCells(Callback):
    """Hydra callback (conf/common.yaml `hydra.callbacks`): before a multirun is split into jobs, record the keys
    it sweeps as `sweep.cell_keys`, one more override of every job. It is part of each job's overrides, so a
    job requeued by Slurm names its run directory exactly as its first attempt did."""

    CELL_KEYS = "sweep.cell_keys"

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        task = OmegaConf.to_container(config.hydra.overrides.task, resolve=False)  # `${...}` stays text here
        overrides = OverridesParser.create().parse_overrides([str(line) for line in task])
        swept = sorted({o.key_or_group for o in overrides if o.is_sweep_override()})
        given = [o.value() for o in overrides if o.key_or_group == self.CELL_KEYS]
        if given:
            unnamed = [key for key in swept if key not in (given[0] or [])]
            if unnamed:  # cells differing only there would share a run directory; Hydra turns exceptions into warnings
                sys.exit(report_error(SweepError(f"{self.CELL_KEYS}={given[0]} leaves out swept {', '.join(unnamed)}")))
        elif swept:
            with read_write(config.hydra.overrides):
                config.hydra.overrides.task.append(f"{self.CELL_KEYS}=[{','.join(swept)}]")


def _require_sweep_dir() -> str:
    """`${ssi.sweep_dir_required:}`: the default of hydra.sweep.dir. A dated default folder could not be
    launched again to resume a sweep, so a multirun without hydra.sweep.dir stops here, before any job, with
    one line (an exception would reach the user as Hydra's traceback)."""
    sys.exit(report_error(SweepError("a multirun needs hydra.sweep.dir=<root>: each run goes to <root>/<cell name>")))


if not OmegaConf.has_resolver("ssi.cell"):
    OmegaConf.register_new_resolver("ssi.cell", _resolve_cell, use_cache=False)
    OmegaConf.register_new_resolver("ssi.sweep_dir_required", _require_sweep_dir, use_cache=False)


# --- a job's run directory and its end ---------------------------------------------------------------------


def bind_job(cfg: DictConfig) -> None:
    """In a multirun: the run directory is Hydra's job directory and the run resumes itself when it can."""
    if not in_multirun():
        return
    if not OmegaConf.is_missing(cfg, "output_dir"):
        raise SweepError(
            f"output_dir={cfg.output_dir} names a single run; in a multirun each job's run directory is "
            "<hydra.sweep.dir>/<cell name>: pass hydra.sweep.dir=<root> instead"
        )
    resume = cfg.get("resume_from_checkpoint")
    if resume not in (None, "auto", "latest"):
        raise SweepError(
            f"resume_from_checkpoint={resume}: in a multirun every job resumes its own run "
            "(resume_from_checkpoint=auto, the default there)"
        )
    cfg.output_dir = HydraConfig.get().runtime.output_dir
    cfg.resume_from_checkpoint = "auto"


def end_job(code: int, kind: str) -> Any:
    """How an entry point ends: `sys.exit(code)` for a single run; in a multirun, return on success and raise
    on failure, except that a stop signal ends a local sweep (its jobs share this process)."""
    if not in_multirun():
        sys.exit(code)
    if code == 0:
        return None
    if code == EXIT_PREEMPTED and not in_submitit_job():
        sys.exit(code)
    name = Path(HydraConfig.get().runtime.output_dir).name
    if code == EXIT_PREEMPTED:
        raise SweepJobFailed(
            f"{kind} job {name} stopped on a signal after saving a checkpoint: launch the sweep again to resume it"
        )
    raise SweepJobFailed(f"{kind} job {name} failed with exit code {code} (its error is logged above)")
