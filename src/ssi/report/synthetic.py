"""A tree of run directories as a finished sweep leaves it, from small files only: for the report's tests and
bench/bench_report.py, which need hundreds of runs and checkpoints without training any.

Each run has the given config (with its cell's settings), a metric log, checkpoints whose files exist but are
empty (the report lists checkpoints by their files and never opens weights), `wer.json` per dataset/split and
`summary.json` per benchmark at every checkpoint, with values that follow the step so that best checkpoints
are well defined.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import yaml

from ssi import run_dir
from ssi.hf_dir import MANIFEST_NAME, REQUIRED_SIDE_FILES, SAFETENSORS_SINGLE

CONF_DIR = Path(__file__).resolve().parents[3] / "conf"


def run_config(model: str = "/models/Llama-3.2-1B-5000-dsus", kind: str = "sft") -> dict[str, Any]:
    """The resolved config a recipe writes into torchtune_config.yaml (composed from the repository's conf/)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    overrides = ["size=tiny", f"data={kind}/synthetic", "data.train.dataset.source=/data/synthetic", f"model={model}",
                 "output_dir=/runs/x"]  # fmt: skip
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return OmegaConf.to_container(compose(config_name=kind, overrides=overrides), resolve=True)


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    *parents, last = key.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[last] = value


def write_run(
    run: Path,
    config: dict[str, Any],
    steps: list[int],
    *,
    wer_sets: tuple[str, ...] = ("synthetic/validation", "synthetic/test"),
    benchmarks: tuple[str, ...] = ("sblimp",),
    offset: float = 0.0,
    manifest: dict[str, Any] | None = None,
) -> Path:
    """One run with a checkpoint, generations and evaluations at each of `steps`; `offset` shifts its values."""
    (run / run_dir.LOGS_DIR).mkdir(parents=True, exist_ok=True)
    (run / run_dir.CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False))
    lines = []
    for step in range(1, steps[-1] + 1):
        fields = f"loss:{3.0 / (1 + step / 50) + offset:.6f} lr:0.0002 grad_norm:1.0"
        if step in steps:
            fields += f" dev_loss:{3.2 / (1 + step / 60) + offset:.6f}"
        lines.append(f"Step {step} | {fields} \n")
    (run / run_dir.LOGS_DIR / "log_1000.txt").write_text("".join(lines))
    for index, step in enumerate(steps):
        ckpt = run_dir.checkpoint_dir(run, 0, step)
        for name in (*REQUIRED_SIDE_FILES, SAFETENSORS_SINGLE):
            (ckpt / name).parent.mkdir(parents=True, exist_ok=True)
            (ckpt / name).write_text("")
        (ckpt / MANIFEST_NAME).write_text(json.dumps(manifest or {"base_model": "Llama-3.2-1B", "n_dsus": 5000}))
        # U-shaped WER (best in the middle), rising accuracy
        wer = 0.2 + offset + 0.1 * abs(index - len(steps) // 2) / max(len(steps), 1)
        for name in wer_sets:
            dataset, split = name.split("/")
            out = run_dir.generations_dir(run, 0, step, dataset, split)
            out.mkdir(parents=True)
            (out / run_dir.GENERATIONS_FILE).write_text("")
            (out / run_dir.WER_FILE).write_text(json.dumps({"wer": wer, "dataset": dataset, "split": split}))
        for name in benchmarks:
            out = run_dir.evaluations_dir(run, 0, step, name)
            out.mkdir(parents=True)
            accuracy = 0.5 + 0.4 * (index + 1) / len(steps) - offset
            summary = {"accuracy": accuracy, "n": 100, "categories": {"a": {"accuracy": accuracy, "n": 50}}}
            (out / run_dir.SUMMARY_FILE).write_text(json.dumps(summary))
    return run


def write_sweep(
    root: Path, config: dict[str, Any], cells: list[dict[str, Any]], steps: list[int], **run_options: Any
) -> list[Path]:
    """`root/cell-<i>` for each cell: `config` with the cell's dotted settings, values offset per cell."""
    runs = []
    for index, cell in enumerate(cells):
        cell_config = copy.deepcopy(config)
        for key, value in cell.items():
            set_dotted(cell_config, key, value)
        set_dotted(cell_config, "output_dir", str(root / f"cell-{index}"))
        runs.append(write_run(root / f"cell-{index}", cell_config, steps, offset=0.01 * index, **run_options))
    return runs
