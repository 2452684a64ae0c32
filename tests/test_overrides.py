"""A mistyped key on any command line is one line naming the closest valid keys, exit code 2, no traceback;
a preset that does not exist lists the presets beside it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ssi.overrides import override_problem

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"

# every Hydra entry point, its configuration and a typo with the key it meant
ENTRY_POINTS = [
    ("recipes/cpt.py", "cpt", "learning_rate=1e-4", "optimizer.lr"),
    ("recipes/sft.py", "sft", "max_step=10", "max_steps"),
    ("scripts/generate.py", "generate", "sampling_params.max_token=8", "sampling_params.max_tokens"),
    ("scripts/evaluate.py", "evaluate", "scroe=mean", "score"),
    ("scripts/encode_audio.py", "encode_audio", "num_shard=4", "num_shards"),
    ("scripts/inspect_data.py", "inspect_data", "n_example=3", "n_examples"),
    ("scripts/train_kmeans.py", "train_kmeans", "ouput=km.npy", "output"),
]


@pytest.mark.parametrize(("config", "typo", "meant"), [e[1:] for e in ENTRY_POINTS])
def test_a_typo_names_the_key_it_probably_meant(config: str, typo: str, meant: str) -> None:
    problem = override_problem(config, [typo], CONF)
    key = typo.split("=")[0]
    assert problem is not None and f"conf/{config}.yaml has no setting {key!r}; did you mean {meant}" in problem
    assert f"write +{typo}" in problem
    assert override_problem(config, [f"+{typo}"], CONF) is None  # a new key on purpose composes


def test_keys_of_the_chosen_preset_and_missing_presets() -> None:
    problem = override_problem("sft", ["data=sft/synthetic", "data.trian.dataset.split=x"], CONF)
    assert problem is not None and "did you mean data.train.dataset.split" in problem
    problem = override_problem("sft", ["data=sft/synthetik"], CONF)
    assert problem is not None and "there is no preset data/sft/synthetik" in problem
    assert "did you mean data/sft/synthetic?" in problem and "the presets in conf/data/sft/ are: " in problem
    assert override_problem("sft", ["data=sft/synthetic", "optimizer.lr=1e-3"], CONF) is None


def test_every_entry_point_refuses_a_typo_in_one_line() -> None:
    procs = {
        script: subprocess.Popen(
            [sys.executable, script, typo], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for script, _, typo, _ in ENTRY_POINTS
    }
    for script, _, _, meant in ENTRY_POINTS:
        out, err = procs[script].communicate(timeout=300)
        assert procs[script].returncode == 2, (script, out, err)
        assert err.count("\n") == 1 and f"did you mean {meant}" in err and "Traceback" not in err, (script, err)
