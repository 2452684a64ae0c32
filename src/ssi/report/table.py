"""Runs side by side: one row per run and checkpoint step, the settings that differ between the runs as
columns, what each step was trained on (text tokens, speech positions, audio hours), and the best checkpoint of
each run (docs/experiments.md, "The report").

Settings that only say where a run lives or how it ran (output dir, logging, device, resume flags...) are never
compared; `model` is shown as `init` (a model directory, or `<run>@<step>` when the run started from another
run's checkpoint) next to the vocabulary's `base_model`, `n_dsus` and `dsu_encoder`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ssi.data.holdout import HoldOut
from ssi.report import ReportInputError
from ssi.report.runs import (
    ACCURACY,
    COUNTED,
    DEV_LOSS,
    INIT,
    LOGGED,
    MANIFEST_SETTINGS,
    WER,
    RunResults,
    headline_metrics,
    names_setting,
)

DEV_WER = "dev_wer"  # --select-by: the WER of the run's dev split (data.dev.dataset.split)
IGNORED_SETTINGS = {
    "output_dir",
    "model",
    "checkpointer.checkpoint_dir",
    "checkpointer.keep_last_n",
    "checkpointer.max_shard_size",
    "resume_from_checkpoint",
    "force_resume",
    "progress",
    "log_steps",
    "save_steps",
    "eval_steps",
    "device",
    "dist_timeout_s",
    "peak_tflops",
    "world_size",
}
IGNORED_PREFIXES = ("metric_logger.", "sweep.")
IGNORED_SUFFIXES = (".num_workers",)
# Settings one kind of run never reads (conf/data/_common.yaml): not compared between runs that all are of the
# other kind, since a difference there changes nothing.
UNUSED_BY_KIND = {
    "sft": ("data.sequence.type", "data.sequence.mixture", "data.sequence.span.", "data.sequence.add_bos",
            "data.sequence.add_eos"),
    "cpt": ("data.sft.",),
}  # fmt: skip
_ABSENT = object()


@dataclass(frozen=True)
class Best:
    step: int
    metric: str


@dataclass
class Report:
    runs: list[RunResults]
    labels: list[str]
    settings: list[str]  # the settings that differ between the runs
    metrics: list[str]  # every metric column, in display order
    counts: list[str]  # the COUNTED columns some run has (runs logged before the counts have none)
    best: list[Best | None]
    missing: list[str]  # across runs: a metric some runs have and others lack entirely


def run_labels(paths: list[Path]) -> list[str]:
    """Each run's path relative to the folder all of them share (a single run: its name)."""
    resolved = [Path(p).resolve() for p in paths]
    if len(resolved) == 1:
        return [resolved[0].name]
    common = Path(os.path.commonpath(resolved))
    return [str(p.relative_to(common)) for p in resolved]


def _compared(key: str) -> bool:
    return key not in IGNORED_SETTINGS and not key.startswith(IGNORED_PREFIXES) and not key.endswith(IGNORED_SUFFIXES)


def differing_settings(runs: list[RunResults]) -> list[str]:
    """Compared settings whose values are not the same in every run (derived vocabulary settings first); the
    settings that the runs' kind (all SFT, or all CPT) does not read are left out."""
    keys = dict.fromkeys([*MANIFEST_SETTINGS, INIT])
    for run in runs:
        keys.update(dict.fromkeys(run.settings))
    kinds = {run.settings.get("data.kind") for run in runs}
    unused = UNUSED_BY_KIND.get(next(iter(kinds)), ()) if len(kinds) == 1 else ()
    return [
        key
        for key in keys
        if _compared(key)
        and not names_setting(key, unused)
        and len({json.dumps(run.settings.get(key, _ABSENT), default=repr, sort_keys=True) for run in runs}) > 1
    ]


def metric_order(names: set[str]) -> list[str]:
    """Losses, then WER per dataset/split, then benchmark accuracies (each benchmark before its categories)."""
    losses = [name for name in LOGGED if name in names]
    wers = sorted(name for name in names if name.startswith(WER))
    accuracies = sorted((name for name in names if name.startswith(ACCURACY)), key=lambda n: n.split("/"))
    return [*losses, *wers, *accuracies]


def higher_is_better(metric: str) -> bool:
    return metric.startswith(ACCURACY)


def dev_wer_metric(run: RunResults) -> str | None:
    """The WER column of the run's dev split: `wer/<dataset>/<data.dev.dataset.split>`, when exactly one dataset
    was scored on that split."""
    split = dev_split(run)
    if split is None:
        return None
    found = sorted(n for n in run.metric_names() if n.startswith(WER) and n.rsplit("/", 1)[1] == str(split))
    if len(found) > 1:
        raise ReportInputError(
            f"{run.path}: the dev split {split!r} was scored on several datasets ({', '.join(found)}); "
            f"choose one with --select-by wer/<dataset>/{split}"
        )
    return found[0] if found else None


def dev_split(run: RunResults) -> str | None:
    """The split name the run's dev results are filed under: its dev section's split, or the name of a hold-out
    of train (`data.dev.from_train`, see ssi.data.holdout); None for a run without a dev section."""
    if "data.dev.dataset.split" not in run.settings:
        return None
    held = run.settings.get("data.dev.from_train")
    if held is not None:
        return f"{run.settings.get('data.train.dataset.split')}_{HoldOut.from_config(held).label}"
    return str(run.settings["data.dev.dataset.split"])


def selection_metric(run: RunResults, select_by: str | None) -> str | None:
    """What picks the run's best checkpoint: `select_by`, or by default its dev WER, else its dev loss."""
    if select_by not in (None, DEV_WER):
        return select_by
    dev_wer = dev_wer_metric(run)
    if dev_wer or select_by == DEV_WER:
        return dev_wer
    return DEV_LOSS if DEV_LOSS in run.metric_names() else None


def best_step(run: RunResults, metric: str | None) -> Best | None:
    """The checkpoint step with the best value of `metric` (the earliest on ties); None if none has one."""
    rows = [row for row in run.steps if metric is not None and metric in row.values]
    if not rows or metric is None:
        return None
    sign = -1 if higher_is_better(metric) else 1
    best = min(rows, key=lambda row: (sign * row.values[metric], row.step))
    return Best(best.step, metric)


def build_report(runs: list[RunResults], select_by: str | None = None) -> Report:
    metrics = metric_order(set().union(*(run.metric_names() for run in runs)))
    if select_by not in (None, DEV_WER) and select_by not in metrics:
        raise ReportInputError(
            f"--select-by {select_by}: no run has that metric; available: {', '.join([DEV_WER, *metrics])}"
        )
    labels = run_labels([run.path for run in runs])
    missing = []
    if len(runs) > 1:
        for metric in headline_metrics(metrics):
            if metric.startswith((WER, ACCURACY)):
                lacking = [label for label, run in zip(labels, runs, strict=True) if metric not in run.metric_names()]
                if lacking and len(lacking) < len(runs):
                    missing.append(f"{metric}: no value in run{'s' if len(lacking) > 1 else ''} {', '.join(lacking)}")
    best = []
    for label, run in zip(labels, runs, strict=True):
        metric = selection_metric(run, select_by)
        best.append(best_step(run, metric))
        if best[-1] is None and run.steps:
            if select_by is None and dev_split(run) is None:
                why = "the run has no dev split (data.dev=null); give --select-by <metric> to choose by another"
            else:
                why = f"no checkpoint step has {metric or 'a dev WER or dev loss'}"
            missing.append(f"{label}: no best checkpoint ({why})")
    counts = [name for name in COUNTED if any(name in run.counts for run in runs)]
    return Report(runs, labels, differing_settings(runs), metrics, counts, best, missing)


def setting_text(run: RunResults, key: str) -> str:
    """A setting of a run as text: YAML's spelling for null and booleans, empty when the run has no such key."""
    value = run.settings.get(key, _ABSENT)
    if value is _ABSENT:
        return ""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def csv_rows(report: Report) -> list[list[Any]]:
    """The header and one row per run and step: run, step, epoch, metrics, what was trained on up to the step,
    differing settings, then whether it is the run's best checkpoint, the checkpoint directory (empty when
    pruned) and the run directory."""
    header = ["run", "step", "epoch", *report.metrics, *report.counts, *report.settings]
    header += ["best", "checkpoint", "run_dir"]
    rows: list[list[Any]] = [header]
    for label, run, best in zip(report.labels, report.runs, report.best, strict=True):
        settings = [setting_text(run, key) for key in report.settings]
        where = run.path.absolute()
        for row in run.steps:
            rows.append(
                [
                    label,
                    row.step,
                    "" if row.epoch is None else row.epoch,
                    *(_number(row.values, metric) for metric in report.metrics),
                    *(_number(row.counts, name) for name in report.counts),
                    *settings,
                    "true" if best is not None and best.step == row.step else "false",
                    row.checkpoint.absolute() if row.checkpoint else "",
                    where,
                ]
            )
    return rows


def _number(values: dict[str, float], name: str) -> str:
    value = values.get(name)
    return "" if value is None else repr(value)
