"""The report's PNG plots: each metric against the step with one line per run (losses from every logged step,
WER and accuracies at checkpoint steps), and train/dev loss per run, 16 runs to a page."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ssi.report.markdown import metric_title
from ssi.report.runs import ACCURACY, LOGGED, TRAIN_LOSS, WER, RunResults
from ssi.report.table import Report
from ssi.run_dir import series

RUNS_PER_PAGE = 16
MAX_LEGEND_RUNS = 30
MAX_POINTS = 400  # per line: a long run's loss log is thinned to this many evenly spaced points (last kept)
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def file_name(metric: str) -> str:
    return _UNSAFE.sub("_", metric) + ".png"


def _points(run: RunResults, metric: str) -> tuple[list[int], list[float]]:
    if metric in LOGGED:
        steps, values = series(run.log, LOGGED[metric])
    else:
        points = [(row.step, row.values[metric]) for row in run.steps if metric in row.values]
        steps, values = [s for s, _ in points], [v for _, v in points]
    if len(steps) > MAX_POINTS:
        keep = sorted({round(i * (len(steps) - 1) / (MAX_POINTS - 1)) for i in range(MAX_POINTS)})
        steps, values = [steps[i] for i in keep], [values[i] for i in keep]
    return steps, values


def _scale(metric: str) -> float:
    return 100.0 if metric.startswith((WER, ACCURACY)) else 1.0


def _save(fig: Figure, path: Path, **options: object) -> str:
    fig.savefig(path, dpi=110, **options)
    return path.name


def metric_plot(report: Report, metric: str, out_dir: Path) -> str | None:
    """`<metric>.png`: the metric against the step, one line per run; None if no run has a value."""
    fig = Figure(figsize=(8, 4.5))
    ax = fig.add_subplot()
    drawn = 0
    for label, run in zip(report.labels, report.runs, strict=True):
        steps, values = _points(run, metric)
        if steps:
            scale = _scale(metric)
            style = "-" if metric == TRAIN_LOSS else "o-"
            ax.plot(steps, [scale * v for v in values], style, label=label, markersize=3, linewidth=1.2)
            drawn += 1
    if not drawn:
        return None
    ax.set_xlabel("optimizer step")
    ax.set_title(metric_title(metric))
    ax.grid(alpha=0.3)
    if drawn <= MAX_LEGEND_RUNS:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    else:
        ax.set_title(f"{metric_title(metric)} ({drawn} runs; legend in report.csv)")
    return _save(fig, out_dir / file_name(metric), bbox_inches="tight")  # room for the legend beside the axes


def _loss_panel(ax: Axes, label: str, run: RunResults) -> None:
    for metric, style in (("train_loss", "-"), ("dev_loss", "o-"), ("text_dev_loss", "s-")):
        steps, values = _points(run, metric)
        if steps:
            ax.plot(steps, values, style, label=metric.replace("_", " "), markersize=3, linewidth=1.0)
    ax.set_title(label if len(label) <= 48 else "…" + label[-47:], fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=6)


def loss_pages(report: Report, out_dir: Path) -> list[str]:
    """`losses.png`, `losses_2.png`, ...: train and dev loss of each run, one panel per run."""
    names = []
    pairs = list(zip(report.labels, report.runs, strict=True))
    for page, start in enumerate(range(0, len(pairs), RUNS_PER_PAGE), start=1):
        chunk = pairs[start : start + RUNS_PER_PAGE]
        cols = min(4, len(chunk))
        rows = -(-len(chunk) // cols)
        fig = Figure(figsize=(4 * cols, 3 * rows))
        for index, (label, run) in enumerate(chunk):
            ax = fig.add_subplot(rows, cols, index + 1)
            _loss_panel(ax, label, run)
            if index % cols == 0:
                ax.set_ylabel("nats/token", fontsize=8)
        fig.supxlabel("optimizer step", fontsize=8)
        fig.subplots_adjust(left=0.06, right=0.98, bottom=0.12 / rows, top=1 - 0.08 / rows, wspace=0.25, hspace=0.45)
        names.append(_save(fig, out_dir / ("losses.png" if page == 1 else f"losses_{page}.png")))
    return names


def write_plots(report: Report, metrics: list[str], out_dir: Path) -> dict[str, list[str]]:
    """Every plot; returns metric (or `losses`) -> the PNG names written into `out_dir`."""
    plots = {}
    for metric in metrics:
        name = metric_plot(report, metric, out_dir)
        if name:
            plots[metric] = [name]
    plots["losses"] = loss_pages(report, out_dir)
    return plots
