"""One run directory as a report sees it: its settings and, for each checkpoint step, the losses, WERs and
benchmark accuracies its files hold and what it was trained on up to there, plus what is missing
(docs/experiments.md, "The report").

Only small files are read (`torchtune_config.yaml`, `logs/`, one `ssi.json`, `wer.json`, `summary.json`) and
nothing is written. A run in progress is read as it is: checkpoints and outputs being written live under
hidden names that `ssi.run_dir` never lists, and a log line still being written is left out. A file that
cannot be read becomes a `problem` (named with its path) instead of a value.
"""

from __future__ import annotations

import bisect
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ssi import run_dir
from ssi.files import FileFormatError, read_json
from ssi.hf_dir import MANIFEST_NAME
from ssi.report import ReportInputError

TRAIN_LOSS, DEV_LOSS, TEXT_DEV_LOSS = "train_loss", "dev_loss", "text_dev_loss"
# report metric -> the key training logs it under (docs/run_directory.md, "Metric logs")
LOGGED = {TRAIN_LOSS: "loss", DEV_LOSS: "dev_loss", TEXT_DEV_LOSS: "text_dev_loss"}
WER, ACCURACY = "wer/", "acc/"
MANIFEST_SETTINGS = ("base_model", "n_dsus", "dsu_encoder")  # from the checkpoint's ssi.json
INIT = "init"  # what the run started from: a model directory, or `<run>@<step>` for another run's checkpoint
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_MAX_LISTED_STEPS = 8


def _hours(seconds: float) -> float:
    return seconds / 3600


# What a run trained on up to a step, counted alike for both methods (ssi.train.recipe.COUNTS), so that runs can
# be compared at equal audio hours: report column -> (the running total training logs, its conversion)
COUNTED: dict[str, tuple[str, Callable[[float], float]]] = {
    "text_tokens": ("consumed_text_tokens", int),
    "speech_positions": ("consumed_speech_positions", int),
    "audio_hours": ("consumed_audio_seconds", _hours),
}


@dataclass
class StepResults:
    """One row of the report: a checkpoint step and what was measured there."""

    step: int
    epoch: int | None = None
    checkpoint: Path | None = None  # None when it was pruned (keep_last_n) but its results remain
    generated: bool = False  # has a generations folder (scored or not)
    values: dict[str, float] = field(default_factory=dict)
    counts: dict[str, float] = field(default_factory=dict)  # COUNTED up to this step


@dataclass
class RunResults:
    path: Path
    settings: dict[str, Any]
    steps: list[StepResults]
    log: dict[int, dict[str, float]]
    missing: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    stop_reason: str | None = None  # the last line of logs/stops.jsonl (ssi.train.budget.STOP_REASONS)
    counts: dict[str, float] = field(default_factory=dict)  # COUNTED over the whole run so far

    def metric_names(self) -> set[str]:
        return {name for row in self.steps for name in row.values}

    @property
    def status(self) -> str:
        """`done` (a checkpoint at max_steps, or `done (max_tokens)` for the budget that ended it), `at step N
        of M` (running, or stopped), or `not started`."""
        max_steps = self.settings.get("max_steps")
        saved = max((row.step for row in self.steps if row.checkpoint), default=None)
        if isinstance(max_steps, int) and saved is not None and saved >= max_steps:
            return "done"
        if self.stop_reason not in (None, "signal"):
            return f"done ({self.stop_reason})"
        last = max(self.log, default=saved)
        if last is None:
            return "not started"
        return f"at step {last} of {max_steps}" if isinstance(max_steps, int) else f"at step {last}"


# Settings a training mode never reads (conf/training.yaml): left out of a run of that mode, so that a
# full run does not show a LoRA rank.
UNREAD_BY_TRAINABLE = {"full": ("lora.",), "new_embeddings": ("lora.", "freeze"), "lora": ("freeze",)}


def names_setting(key: str, names: Sequence[str]) -> bool:
    """Whether `key` is one of `names`, where a name ending in "." stands for every key under it."""
    return any(key == name or (name.endswith(".") and key.startswith(name)) for name in names)


# ... and settings a method never reads (a units run shows no speech encoder); runs from before the features
# method have no `method` key: they are units runs.
UNREAD_BY_METHOD = {"units": ("speech_encoder.", "projector.")}


def _read_settings(settings: dict[str, Any]) -> dict[str, Any]:
    settings = {"method": "units", **settings}
    unread = (
        *UNREAD_BY_TRAINABLE.get(str(settings.get("trainable", "full")), ()),
        *UNREAD_BY_METHOD.get(str(settings["method"]), ()),
    )
    return {k: v for k, v in settings.items() if not names_setting(k, unread)}


def _stop_reason(path: Path) -> str | None:
    stops = path / run_dir.LOGS_DIR / run_dir.STOPS_FILE
    if not stops.is_file():
        return None
    lines = stops.read_text().splitlines()
    try:
        return json.loads(lines[-1])["reason"] if lines else None
    except (ValueError, KeyError, TypeError):
        return None


def expand(path: Path, depth: int = 3) -> list[Path]:
    """A run directory, or a folder of runs (a sweep's `hydra.sweep.dir`, or a chain's root holding `cpt/` and
    `sft/`) as the runs up to `depth` levels below it, sorted; hidden folders (`.submitit`) are skipped."""
    if not path.is_dir():
        raise ReportInputError(f"{path} is not a directory (expected a run directory: a recipe's output_dir)")
    if run_dir.is_run_dir(path):
        return [path]
    runs = []
    level = [path]
    for _ in range(depth):
        level = [c for folder in level for c in sorted(folder.iterdir()) if not c.name.startswith(".") and c.is_dir()]
        runs += [c for c in level if run_dir.is_run_dir(c)]
        level = [c for c in level if not run_dir.is_run_dir(c)]
    if not runs:
        raise ReportInputError(
            f"{path} is not a run directory (no {run_dir.CONFIG_FILE}) and holds none (a sweep's folder would)"
        )
    return sorted(runs)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys for nested settings; lists become their JSON text so that settings compare as values."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, (list, dict)) else value
    return flat


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


class _Reader:
    """Reads files of one run, turning every unreadable one into a problem line."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def json(self, path: Path) -> Any:
        try:
            return read_json(path)
        except FileFormatError as err:
            self.problems.append(_one_line(err))
        except OSError as err:
            self.problems.append(f"{path}: unreadable ({_one_line(err)})")
        return None

    def number(self, path: Path, data: Any, key: str) -> float | None:
        """`data[key]` as a float; null (nothing was measured) is no value, anything else not a number a problem."""
        if not isinstance(data, dict) or key not in data:
            self.problems.append(f"{path}: no `{key}` field")
            return None
        value = data[key]
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            self.problems.append(f"{path}: `{key}` is not a number ({value!r})")
            return None
        return float(value)

    def config(self, path: Path) -> dict[str, Any]:
        try:
            tree = yaml.load(path.read_text(), Loader=_LOADER)
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
            self.problems.append(f"{path}: unreadable run config ({_one_line(err)})")
            return {}
        if not isinstance(tree, dict):
            self.problems.append(f"{path}: not a run config (a YAML mapping)")
            return {}
        return tree

    def log(self, run: Path) -> dict[int, dict[str, float]]:
        try:
            return run_dir.read_metrics(run)
        except FileNotFoundError:
            return {}
        except run_dir.RunDirError as err:
            self.problems.append(_one_line(err))
            return {}


def accuracies(benchmark: str, summary: dict[str, Any], path: Path, reader: _Reader) -> dict[str, float]:
    """`acc/<benchmark>` from `summary.json`'s `accuracy`, and one column per entry of its groups of
    `{accuracy, n}` objects: `acc/<benchmark>/<category>` for `categories`, `acc/<benchmark>/<group>/<name>`
    for any other group (e.g. `zerospeech`)."""
    overall = reader.number(path, summary, "accuracy")
    values = {} if overall is None else {f"{ACCURACY}{benchmark}": overall}
    for group, entries in summary.items():
        if not isinstance(entries, dict) or not all(isinstance(e, dict) and "accuracy" in e for e in entries.values()):
            continue
        prefix = f"{ACCURACY}{benchmark}/" + ("" if group == "categories" else f"{group}/")
        for name, entry in entries.items():
            value = reader.number(path, entry, "accuracy")
            if value is not None:
                values[f"{prefix}{name}"] = value
    return values


def headline_metrics(metrics: list[str] | set[str]) -> list[str]:
    """The metrics with a table and a plot of their own: per-category accuracies are in report.csv only."""
    return [m for m in metrics if not m.startswith(ACCURACY) or m.count("/") == 1]


def steps_text(steps: list[int]) -> str:
    shown = ", ".join(str(s) for s in steps[:_MAX_LISTED_STEPS])
    more = f" and {len(steps) - _MAX_LISTED_STEPS} more" if len(steps) > _MAX_LISTED_STEPS else ""
    return f"step{'s' if len(steps) > 1 else ''} {shown}{more}"


def _manifest_settings(rows: list[StepResults], model: Any, reader: _Reader) -> dict[str, Any]:
    """base model, unit count and unit encoder of the run's vocabulary: the newest checkpoint's ssi.json, else
    the start model's."""
    candidates = [row.checkpoint for row in reversed(rows) if row.checkpoint is not None][:1]
    if model is not None:
        candidates.append(Path(str(model)))
    for directory in candidates:
        if (directory / MANIFEST_NAME).is_file():
            manifest = reader.json(directory / MANIFEST_NAME)
            if isinstance(manifest, dict):
                return {key: manifest.get(key) for key in MANIFEST_SETTINGS}
    return {}


def _init(model: Any) -> str | None:
    if model is None:
        return None
    where = run_dir.locate_checkpoint(str(model))
    return f"{where.run_dir}@{where.step}" if where.run_dir is not None else str(model)


def _fill_logged(rows: list[StepResults], log: dict[int, dict[str, float]]) -> None:
    """Train loss: the value logged at the step or the last one before it (training logs every log_steps);
    dev losses: only a value evaluated at that very step."""
    for name, key in LOGGED.items():
        logged = sorted(step for step, values in log.items() if key in values)
        for row in rows:
            if name == TRAIN_LOSS:
                at = bisect.bisect_right(logged, row.step)
                if at:
                    row.values[name] = log[logged[at - 1]][key]
            elif key in log.get(row.step, {}):
                row.values[name] = log[row.step][key]


def _fill_counts(rows: list[StepResults], log: dict[int, dict[str, float]]) -> dict[str, float]:
    """COUNTED at each row's step (the running totals logged at that step, which training logs at every checkpoint,
    or the last before it); returns them over the whole log."""
    whole = {}
    for name, (key, convert) in COUNTED.items():
        logged = sorted(step for step, values in log.items() if key in values)
        if logged:
            whole[name] = convert(log[logged[-1]][key])
        for row in rows:
            at = bisect.bisect_right(logged, row.step)
            if at:
                row.counts[name] = convert(log[logged[at - 1]][key])
    return whole


def _missing(path: Path, rows: list[StepResults], has_log: bool) -> list[str]:
    missing = []
    if not has_log:
        missing.append(f"{path}: no metric logs yet ({run_dir.LOGS_DIR}/)")
    checkpoint_steps = [row.step for row in rows if row.checkpoint is not None]
    if not checkpoint_steps:
        missing.append(f"{path}: no complete checkpoint yet")
    without = [row.step for row in rows if row.checkpoint is not None and not row.generated]
    if without and len(without) == len(checkpoint_steps):
        missing.append(f"{path}: no generations for any checkpoint")
    elif without:
        missing.append(f"{path}: no generations at {steps_text(without)}")
    names = {name for row in rows for name in row.values if name.startswith((WER, ACCURACY))}
    for name in sorted(headline_metrics(names)):
        lacking = [row.step for row in rows if name not in row.values]
        if lacking:
            missing.append(f"{path}: {name} missing at {steps_text(lacking)}")
    return missing


def read_run(path: Path) -> RunResults:
    """Everything the report needs from one run directory (see the module docstring)."""
    path = Path(path)
    if not run_dir.is_run_dir(path):
        raise ReportInputError(f"{path} is not a run directory (no {run_dir.CONFIG_FILE})")
    reader = _Reader()
    settings = _read_settings(flatten(reader.config(path / run_dir.CONFIG_FILE)))
    rows: dict[int, StepResults] = {}

    def row(step: int, epoch: int) -> StepResults:
        found = rows.setdefault(step, StepResults(step, epoch))
        found.epoch = epoch if found.epoch is None else found.epoch
        return found

    for ckpt in run_dir.list_checkpoints(path):
        row(ckpt.step, ckpt.epoch).checkpoint = ckpt.path
    missing = []
    for out in run_dir.list_generations(path):
        at = row(out.step, out.epoch)
        at.generated = True
        wer_file = out.path / run_dir.WER_FILE
        if not wer_file.is_file():
            missing.append(f"{out.path}: generations without {run_dir.WER_FILE} (not scored)")
        elif (data := reader.json(wer_file)) is not None and (
            value := reader.number(wer_file, data, "wer")
        ) is not None:
            at.values[f"{WER}{out.name}"] = value
    for out in run_dir.list_evaluations(path):
        at = row(out.step, out.epoch)
        summary_file = out.path / run_dir.SUMMARY_FILE
        if not summary_file.is_file():
            missing.append(f"{out.path}: no {run_dir.SUMMARY_FILE}")
        elif isinstance(data := reader.json(summary_file), dict):
            at.values.update(accuracies(out.name, data, summary_file, reader))
        elif data is not None:
            reader.problems.append(f"{summary_file}: not a JSON object")
    ordered = sorted(rows.values(), key=lambda r: r.step)
    log = reader.log(path)
    _fill_logged(ordered, log)
    counts = _fill_counts(ordered, log)
    settings.update(_manifest_settings(ordered, settings.get("model"), reader))
    settings[INIT] = _init(settings.get("model"))
    has_log = (path / run_dir.LOGS_DIR).is_dir()
    missing = _missing(path, ordered, has_log) + missing
    return RunResults(path, settings, ordered, log, missing, reader.problems, _stop_reason(path), counts)
