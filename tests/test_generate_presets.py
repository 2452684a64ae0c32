"""Generation reads only what it needs of a data preset: a model outside a run, given a preset and only its
test source (README: "a model outside a run: give the data"), generates without the training source that
the preset leaves `???`; every unit and audio preset resolves its test split for generation that way."""

from __future__ import annotations

import json
import shutil

import pytest

from ssi.generate.pipeline import main as generate_main
from ssi.generate.prompts import resolve_data_config, resolve_split, section_source
from ssi.run_dir import locate_checkpoint

from .test_features_method import checkpoint, features_args
from .test_features_method import parts as parts  # the module's corpus and encoders, shared
from .test_train_recipe import REPO, make_cfg, run

PRESETS = sorted(p.stem for p in (REPO / "conf/data/sft").glob("*.yaml"))


def test_a_features_checkpoint_outside_a_run_generates_from_a_test_source_alone(
    tiny_base_dir, parts, tmp_path, capsys
) -> None:
    run("sft", features_args(tiny_base_dir, parts, tmp_path / "run", "trainable=projector", "max_steps=1",
                             "save_steps=1"))  # fmt: skip
    outside = shutil.copytree(checkpoint(tmp_path / "run", 1), tmp_path / "models" / "features-asr")
    test_source = f"data.test.dataset.source={parts['corpus']}"
    args = ["progress=false", f"model={outside}", "data=sft/audio_folder", test_source, "gen.split=test",
            f"gen.output_dir={tmp_path / 'out'}", "backend=torch", "sampling_params.max_tokens=4"]  # fmt: skip
    code = generate_main(make_cfg("generate", args))
    err = capsys.readouterr().err
    assert code == 0, err
    assert "Traceback" not in err
    lines = (tmp_path / "out" / "generations.jsonl").read_text().splitlines()
    assert len(lines) == 16 and json.loads(lines[0])["id"].startswith("test-")


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_gives_generation_its_test_split_from_a_test_source_alone(preset, tmp_path) -> None:
    """What generation reads of a preset (the split's section and source) resolves when only the test source is
    given; the values it does not read (train sources left `???`) stay unread."""
    method = ["+method=features"] if preset == "paired_folder" else []  # its columns follow the run's method
    cfg = make_cfg("generate", [f"model={tmp_path}", f"data=sft/{preset}", "data.test.dataset.source=/data/test-set",
                                "gen.split=test", *method])  # fmt: skip
    data, _ = resolve_data_config(cfg, locate_checkpoint(tmp_path), tmp_path)
    section, split = resolve_split(data, "test")
    assert section == "test" and split == str(data.test.dataset.split)
    assert section_source(data, "test").spec.source == "/data/test-set"
