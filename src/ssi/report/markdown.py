"""`report.md`: a table per metric (rows: runs, with the settings that differ as columns; columns: checkpoint
steps, or the best and last checkpoint when there are too many steps), the best checkpoint of each run in
bold, the plots, and what is missing. Losses are in nats per token, WER and accuracies in percent; what a run
trained on is shown as text tokens, speech positions and audio hours, which mean the same for both methods."""

from __future__ import annotations

import datetime
import re
from pathlib import Path

from ssi.report.runs import ACCURACY, INIT, TEXT_DEV_LOSS, TRAIN_LOSS, WER, RunResults, headline_metrics
from ssi.report.table import DEV_WER, Report, higher_is_better, setting_text

_TITLES = {TRAIN_LOSS: "Train loss", "dev_loss": "Dev loss", TEXT_DEV_LOSS: "Text dev loss"}
_COUNT_TITLES = {"text_tokens": "text tokens", "speech_positions": "speech positions", "audio_hours": "audio hours"}
_INIT_RUN = re.compile(r"^(?P<run>/.*)@(?P<step>\d+)$")


def metric_title(metric: str) -> str:
    if metric.startswith(WER):
        return f"WER (%) on {metric.removeprefix(WER)}"
    if metric.startswith(ACCURACY):
        return f"Accuracy (%) on {metric.removeprefix(ACCURACY)}"
    return _TITLES.get(metric, metric)


def value_text(metric: str, value: float | None) -> str:
    if value is None:
        return ""
    return f"{100 * value:.2f}" if metric.startswith((WER, ACCURACY)) else f"{value:.4f}"


def count_text(name: str, value: float | None) -> str:
    """Tokens and positions in full (`1,234,567`), hours to 3 significant digits (whole hours from 100 on)."""
    if value is None:
        return ""
    if name != "audio_hours":
        return f"{int(value):,}"
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]


def shown_setting(report: Report, key: str, run: RunResults) -> str:
    """A setting as a table shows it: a path by its last component, another run of the report by its label."""
    text = setting_text(run, key)
    if key == INIT and (match := _INIT_RUN.match(text)):
        labels = {str(r.path.resolve()): label for r, label in zip(report.runs, report.labels, strict=True)}
        where = labels.get(match["run"], Path(match["run"]).name)
        return f"{where}@{match['step']}"
    return Path(text).name if text.startswith("/") else text


def _selected_by(report: Report, select_by: str | None) -> str:
    if select_by is None:
        return "the run's dev WER (`wer/<dataset>/<dev split>`), else its dev loss"
    if select_by == DEV_WER:
        return "the run's dev WER (`wer/<dataset>/<dev split>`)"
    return f"`{select_by}` ({'highest' if higher_is_better(select_by) else 'lowest'})"


def render(
    report: Report, sources: list[str], plots: dict[str, list[str]], select_by: str | None, max_step_columns: int
) -> str:
    """The whole report.md; `plots` maps a metric (or `losses`) to its PNG files beside report.md."""
    runs, labels = report.runs, report.labels
    n_rows = sum(len(run.steps) for run in runs)
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Experiment report",
        "",
        f"{len(runs)} run{'s' if len(runs) != 1 else ''}, {n_rows} checkpoint steps, read from "
        + ", ".join(f"`{s}`" for s in sources)
        + f" on {now} by `scripts/report.py`. All values are in `report.csv` (per-category benchmark accuracies too).",
        "",
        f"Best checkpoint of each run (**bold**): selected by {_selected_by(report, select_by)}. "
        "Losses in nats/token (train loss: the last logged value at or before the step), WER and accuracy in %.",
        "",
    ]
    if report.counts:
        lines += [
            "Trained on, summed over ranks: text tokens; speech positions (unit tokens with method=units, audio "
            "slots with method=features: their number per second differs); audio hours behind them, which compare "
            "runs of any method or encoder at equal data (`max_audio_hours`).",
            "",
        ]
    counted = [_COUNT_TITLES[name] for name in report.counts]
    settings = report.settings
    lines += ["## Runs", ""]
    rows = []
    for label, run, best in zip(labels, runs, report.best, strict=True):
        checkpoints = sum(1 for row in run.steps if row.checkpoint is not None)
        chosen = f"{best.step} ({best.metric})" if best else ""
        counts = [count_text(name, run.counts.get(name)) for name in report.counts]
        rows.append(
            [label, *(shown_setting(report, k, run) for k in settings), *counts, run.status, str(checkpoints), chosen]
        )
    lines += _table(["run", *settings, *counted, "status", "checkpoints", "best step (by)"], rows)
    lines += ["", "## Best checkpoints", ""]
    rows = []
    for label, run, best in zip(labels, runs, report.best, strict=True):
        row = next((r for r in run.steps if best is not None and r.step == best.step), None)
        values = [value_text(m, row.values.get(m)) if row else "" for m in headline_metrics(report.metrics)]
        counts = [count_text(name, row.counts.get(name)) if row else "" for name in report.counts]
        step = str(best.step) if best else ""
        rows.append([label, *(shown_setting(report, k, run) for k in settings), step, *counts, *values])
    lines += _table(["run", *settings, "step", *counted, *headline_metrics(report.metrics)], rows)

    steps = sorted({row.step for run in runs for row in run.steps})
    by_step = len(steps) <= max_step_columns
    for metric in headline_metrics(report.metrics):
        lines += ["", f"## {metric_title(metric)}", ""]
        lines += [f"![{metric}]({name})" for name in plots.get(metric, [])]
        if plots.get(metric):
            lines.append("")
        rows = []
        for label, run, best in zip(labels, runs, report.best, strict=True):
            values = {row.step: row.values.get(metric) for row in run.steps}
            marked = best.step if best is not None else None
            if by_step:
                cells = [_marked(value_text(metric, values.get(s)), s == marked) for s in steps]
            else:
                last = max((s for s, v in values.items() if v is not None), default=None)
                cells = [
                    f"{value_text(metric, values.get(marked))} (step {marked})"
                    if values.get(marked) is not None
                    else "",
                    f"{value_text(metric, values[last])} (step {last})" if last is not None else "",
                ]
            rows.append([label, *(shown_setting(report, k, run) for k in settings), *cells])
        columns = [f"step {s}" for s in steps] if by_step else ["best checkpoint", "last"]
        lines += _table(["run", *settings, *columns], rows)
    if plots.get("losses"):
        lines += ["", "## Losses per run", "", *(f"![losses]({name})" for name in plots["losses"])]
    missing = [m for run in runs for m in run.missing] + report.missing
    lines += ["", "## Missing", ""] + ([f"- {m}" for m in missing] or ["Nothing: every checkpoint has every result."])
    problems = [p for run in runs for p in run.problems]
    if problems:
        lines += ["", "## Unreadable files (left out)", "", *(f"- {p}" for p in problems)]
    return "\n".join(lines) + "\n"


def _marked(text: str, best: bool) -> str:
    return f"**{text}**" if best and text else text
