"""Reading a run's metrics back from torchtune's disk logs (`<run>/logs/log_<time>.txt`).

Each line is `Step <n> | key:value key:value ...`. A resumed run appends a new file; later files win for
the steps they repeat, so the merged view is the history of the run as it finally happened.
"""

from __future__ import annotations

import re
from pathlib import Path

_STEP_LINE = re.compile(r"^Step (\d+) \| (.*)$")


def read_metrics(run_dir: str | Path) -> dict[int, dict[str, float]]:
    """{step: {metric: value}} over all log files of a run, oldest file first."""
    log_dir = Path(run_dir) / "logs"
    if not log_dir.is_dir():
        raise FileNotFoundError(f"{run_dir} has no logs/ folder: is it a run directory (output_dir of a recipe)?")
    steps: dict[int, dict[str, float]] = {}
    for path in sorted(log_dir.glob("log_*.txt"), key=lambda p: (p.stat().st_mtime, p.name)):
        for line in path.read_text().splitlines():
            match = _STEP_LINE.match(line)
            if match:
                fields = (item.split(":", 1) for item in match.group(2).split())
                steps.setdefault(int(match.group(1)), {}).update({k: float(v) for k, v in fields})
    return steps


def series(metrics: dict[int, dict[str, float]], key: str) -> tuple[list[int], list[float]]:
    """Steps and values of one metric, in step order (steps where it was not logged are left out)."""
    points = sorted((step, values[key]) for step, values in metrics.items() if key in values)
    return [s for s, _ in points], [v for _, v in points]
