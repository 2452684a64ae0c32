"""LoRA, freezing by name and budgets in the training recipe, on the tiny extended model.

The merged checkpoints are checked against the adapters' own arithmetic (W + scale B A, base rows bit-identical)
and against PEFT, which loads the exported adapter onto the extended base (tests/peft_reader.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ssi import run_dir
from ssi.data.synthetic import SyntheticSpec, make_synthetic_dataset
from ssi.run_dir import read_metrics as metrics
from ssi.train.recipe import RecipeError, SpeechTrainingRecipe, run_recipe
from ssi.vocab.extend import extend_model_dir

from .conftest import N_TEST_DSUS
from .test_train_recipe import make_cfg, overrides, recipe_cmd, run

REPO = Path(__file__).resolve().parents[1]
BASE_VOCAB = 2256  # the tiny tokenizer's vocabulary: the extension's rows start here
LORA = ["trainable=lora", "lora.rank=4", "lora.alpha=8", "optimizer.lr=1e-2"]
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = SyntheticSpec(n_train=64, n_validation=16, n_test=16, n_units=N_TEST_DSUS, seed=3)
    return make_synthetic_dataset(tmp_path_factory.mktemp("lora-corpus") / "corpus", spec, progress=False)


@pytest.fixture(scope="module")
def lora_run(tiny_extended_dir: Path, corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    """12 LoRA steps (checkpoints at 6 and 12) and the dev loss before training."""
    out = tmp_path_factory.mktemp("lora") / "run"
    args = overrides("cpt", tiny_extended_dir, corpus, out, *LORA, "max_steps=12", "save_steps=6", "eval_steps=12")
    _, code, initial = run("cpt", args, evaluate_first=True)
    assert code == 0
    return out, initial


def load_dir(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model directory, whatever its sharding."""
    return {k: v for path in sorted(model_dir.glob("*.safetensors")) for k, v in load_file(path).items()}


def checkpoint(run: Path, step: int) -> Path:
    (found,) = (run / "checkpoints").glob(f"epoch_*/global_step_{step}")
    return found


def peft_difference(base: Path, ckpt: Path) -> dict[str, float]:
    tokens = json.dumps([1, 5, 300, BASE_VOCAB + 2, BASE_VOCAB + 150, 17, BASE_VOCAB + 299, 2])
    done = subprocess.run(
        [sys.executable, str(REPO / "tests/peft_reader.py"), str(base), str(ckpt), tokens],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_lora_learns_and_the_merged_checkpoint_is_the_base_plus_scaled_adapters(tiny_extended_dir, lora_run) -> None:
    out, initial = lora_run
    assert float(metrics(out)[12]["dev_loss"]) < 0.9 * initial
    ckpt = checkpoint(out, 12)
    before, after = load_file(tiny_extended_dir / "model.safetensors"), load_file(ckpt / "model.safetensors")
    adapter = load_file(ckpt / "adapter/adapter_model.safetensors")
    config = json.loads((ckpt / "adapter/adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and sorted(config["target_modules"]) == sorted(TARGETS)
    vocab = before["model.embed_tokens.weight"].shape[0]
    assert config["trainable_token_indices"] == {"embed_tokens": list(range(BASE_VOCAB, vocab))}
    scale = 8 / 4
    assert before.keys() == after.keys()
    adapted = 0
    for name, weight in before.items():
        module = name.removesuffix(".weight").rsplit(".", 1)[-1]
        if module in TARGETS:
            a = adapter[f"base_model.model.{name.removesuffix('.weight')}.lora_A.weight"]
            b = adapter[f"base_model.model.{name.removesuffix('.weight')}.lora_B.weight"]
            assert b.abs().max() > 0, name  # trained
            torch.testing.assert_close(after[name], weight + scale * (b @ a), rtol=0, atol=1e-6)
            adapted += 1
        elif name == "model.embed_tokens.weight":
            assert torch.equal(after[name][:BASE_VOCAB], weight[:BASE_VOCAB])  # base rows bit-identical
            new_rows = adapter["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"]
            assert torch.equal(after[name][BASE_VOCAB:], new_rows) and not torch.equal(new_rows, weight[BASE_VOCAB:])
        else:
            assert torch.equal(after[name], weight), name  # norms: frozen, bit-identical
    assert adapted == 2 * len(TARGETS)
    # the training state keeps only what was trained: no master weights, a small optimizer state
    state_dir = run_dir.training_state_dir(ckpt)
    kept = load_file(state_dir / run_dir.TRAINED_TENSORS_FILE)
    assert all(k.endswith(("lora_a.weight", "lora_b.weight", ".new")) for k in kept)
    assert not (state_dir / run_dir.MASTER_WEIGHTS_FILE).exists()
    optimizer = torch.load(state_dir / run_dir.TRAINING_STATE_FILE, weights_only=False)["optimizer"]["state"]
    assert set(optimizer) == set(kept)
    assert sum(t.nbytes for t in kept.values()) < 0.25 * (ckpt / "model.safetensors").stat().st_size


@pytest.mark.slow
def test_peft_loads_the_adapter_to_the_merged_logits(tiny_extended_dir, lora_run) -> None:
    found = peft_difference(tiny_extended_dir, checkpoint(lora_run[0], 12))
    assert found["max_abs_diff"] <= 1e-5, found


@pytest.mark.slow
def test_peft_reads_an_untied_head_and_a_module_subset(untied_base_dir, corpus, tmp_path) -> None:
    base = extend_model_dir(untied_base_dir, tmp_path / "untied-extended", N_TEST_DSUS, progress=False)
    out = tmp_path / "run"
    args = overrides(
        "cpt", base, corpus, out, *LORA, "max_steps=4", "save_steps=4", "checkpointer.save_dtype=fp32",
        "lora.modules=[q_proj,v_proj,down_proj]",
    )  # fmt: skip
    run("cpt", args)
    ckpt = checkpoint(out, 4)
    config = json.loads((ckpt / "adapter/adapter_config.json").read_text())
    assert set(config["trainable_token_indices"]) == {"embed_tokens", "lm_head"}
    assert sorted(config["target_modules"]) == ["down_proj", "q_proj", "v_proj"]
    before, after = load_dir(base), load_dir(ckpt)
    for name in before:  # k_proj, o_proj, gate/up_proj are not adapted: unchanged (bf16 -> fp32 is exact)
        if any(m in name for m in ("k_proj", "o_proj", "gate_proj", "up_proj", "norm")):
            assert torch.equal(after[name], before[name].float()), name
    found = peft_difference(base, ckpt)
    assert found["max_abs_diff"] <= 1e-5, found


def test_lora_resume_is_bit_identical(tiny_extended_dir, corpus, lora_run, tmp_path) -> None:
    first, _ = lora_run
    args = overrides(
        "cpt", tiny_extended_dir, corpus, tmp_path / "b", *LORA, "max_steps=12", "save_steps=6", "eval_steps=12",
        f"resume_from_checkpoint={checkpoint(first, 6)}",
    )  # fmt: skip
    run("cpt", args)
    a, b = metrics(first), metrics(tmp_path / "b")
    for step in range(7, 13):
        assert a[step]["loss"] == b[step]["loss"], step
    for name in ("model.safetensors", "adapter/adapter_model.safetensors"):
        assert (checkpoint(first, 12) / name).read_bytes() == (checkpoint(tmp_path / "b", 12) / name).read_bytes()


def test_lora_resume_refuses_a_changed_base(tiny_extended_dir, corpus, lora_run, tmp_path) -> None:
    import shutil

    changed = tmp_path / "base"
    shutil.copytree(tiny_extended_dir, changed)
    weights = load_file(changed / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"] * 2
    from safetensors.torch import save_file

    save_file(weights, str(changed / "model.safetensors"), metadata={"format": "pt"})
    shutil.copytree(lora_run[0], tmp_path / "run")
    args = overrides(
        "cpt", changed, corpus, tmp_path / "run", *LORA, "max_steps=13", "save_steps=6", "eval_steps=12",
        "resume_from_checkpoint=latest", "force_resume=true",
    )  # fmt: skip
    with pytest.raises(RecipeError, match=r"the base weights .*model.safetensors changed since the run started"):
        SpeechTrainingRecipe(make_cfg("cpt", args), "cpt").setup()


@pytest.mark.slow
def test_lora_on_two_ranks_equals_one(tiny_extended_dir, corpus, tmp_path) -> None:
    common = [*LORA, "max_steps=4", "save_steps=4", "eval_steps=4"]
    run("cpt", overrides("cpt", tiny_extended_dir, corpus, tmp_path / "one", *common))
    two = overrides("cpt", tiny_extended_dir, corpus, tmp_path / "two", *common, "gradient_accumulation_steps=1")
    done = subprocess.run(recipe_cmd("cpt", two, nproc=2), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    for step in range(1, 5):
        assert float(a[step]["loss"]) == pytest.approx(float(b[step]["loss"]), abs=1e-4), step
    assert float(a[4]["dev_loss"]) == pytest.approx(float(b[4]["dev_loss"]), abs=1e-4)
    one, two = (load_file(checkpoint(tmp_path / r, 4) / "adapter/adapter_model.safetensors") for r in ("one", "two"))
    for name in one:
        torch.testing.assert_close(one[name], two[name], rtol=0, atol=1e-4)


@pytest.mark.slow
def test_lora_with_packing_activation_checkpointing_and_compile(tiny_extended_dir, corpus, tmp_path) -> None:
    common = [*LORA, "max_steps=3", "save_steps=1000", "gradient_accumulation_steps=1", "data.packing.enabled=true"]
    run("cpt", overrides("cpt", tiny_extended_dir, corpus, tmp_path / "plain", *common))
    faster = ["enable_activation_checkpointing=true", "compile=true"]
    run("cpt", overrides("cpt", tiny_extended_dir, corpus, tmp_path / "compiled", *common, *faster))
    plain, compiled = metrics(tmp_path / "plain"), metrics(tmp_path / "compiled")
    for step in (1, 2, 3):
        assert compiled[step]["loss"] == pytest.approx(plain[step]["loss"], abs=1e-5)


def test_bf16_mixed_precision_keeps_a_bf16_base_in_bf16(untied_base_dir, corpus, tmp_path) -> None:
    base = extend_model_dir(untied_base_dir, tmp_path / "extended", N_TEST_DSUS, progress=False)
    args = overrides("cpt", base, corpus, tmp_path / "run", *LORA, "max_steps=2", "save_steps=2", "dtype=bf16")
    recipe, code, _ = run("cpt", args)
    assert code == 0
    dtypes = {(p.requires_grad, p.dtype) for p in recipe.model.parameters()}
    assert dtypes == {(False, torch.bfloat16), (True, torch.float32)}  # frozen as stored, trained in fp32
    before, after = load_dir(base), load_dir(checkpoint(tmp_path / "run", 2))
    for name in before:
        if "norm" in name:
            assert torch.equal(after[name], before[name]), name


def test_freeze_by_name_leaves_the_matched_weights_bit_identical(tiny_extended_dir, corpus, tmp_path) -> None:
    patterns = "freeze=['^model\\.layers\\.0\\.','norm']"
    run("cpt", overrides("cpt", tiny_extended_dir, corpus, tmp_path / "run", "max_steps=2", "save_steps=2", patterns))
    before, after = (
        load_file(tiny_extended_dir / "model.safetensors"),
        load_file(checkpoint(tmp_path / "run", 2) / "model.safetensors"),
    )
    for name in before:
        frozen = name.startswith("model.layers.0.") or "norm" in name
        assert torch.equal(before[name], after[name]) == frozen, name
    assert "freeze:" in (tmp_path / "run" / run_dir.CONFIG_FILE).read_text()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["trainable=lora", "lora.rank=0"], "lora.rank must be >= 1, got 0"),
        (["trainable=lora", "lora.modules=[q_proj,qkv]"], "lora.modules: ['qkv'] is not a choice of"),
        (["trainable=adapters"], "trainable must be one of ['full', 'new_embeddings', 'lora', 'projector'], got"),
        (["freeze=[lm_head]"], "freeze: 'lm_head' matches no parameter (HF names, e.g. 'model.embed_tokens.weight')"),
        (["trainable=lora", "freeze=[norm]"], "freeze applies to trainable=full"),
        (["max_tokens=0"], "max_tokens must be > 0"),
        (["lr_scheduler.span=tokens"], "lr_scheduler.span must be one of ['max_steps', 'budget']"),
    ],
)
def test_lora_freeze_and_budget_settings_are_refused_in_one_line(
    tiny_extended_dir, corpus, tmp_path, capsys, extra, message
) -> None:
    args = overrides("cpt", tiny_extended_dir, corpus, tmp_path / "run", "max_steps=1", *extra)
    assert run_recipe(make_cfg("cpt", args), "cpt") == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_lora_needs_an_extended_model(tiny_base_dir, corpus, tmp_path, capsys) -> None:
    args = overrides("cpt", tiny_base_dir, corpus, tmp_path / "run", *LORA, "max_steps=1")
    assert run_recipe(make_cfg("cpt", args), "cpt") == 2
    assert "not a speech-extended model: create one with scripts/extend_llama3_2.py" in capsys.readouterr().err


def stops(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "logs" / run_dir.STOPS_FILE).read_text().splitlines()]


def test_a_token_budget_stops_with_a_checkpoint_and_a_stopped_run_refuses_to_go_on(
    tiny_extended_dir, corpus, tmp_path
) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    args = overrides("cpt", tiny_extended_dir, corpus, out, *LORA, "max_steps=50", "save_steps=100", "max_tokens=1500")
    recipe, code, _ = run("cpt", args)
    assert code == 0
    step = recipe.global_step
    assert 1 < step < 50 and recipe.totals["tokens"] >= 1500  # ended by the token budget, not max_steps
    assert stops(out)[-1] == {**stops(out)[-1], "reason": "max_tokens", "step": step}
    ckpt = checkpoint(out, step)
    saved = torch.load(run_dir.training_state_dir(ckpt) / run_dir.TRAINING_STATE_FILE, weights_only=False)
    assert saved["stop_reason"] == "max_tokens"
    AutoModelForCausalLM.from_pretrained(ckpt)  # a complete model directory

    with pytest.raises(RecipeError, match=r"ended its run on max_tokens=1500: raise max_tokens to train further"):
        SpeechTrainingRecipe(make_cfg("cpt", [*args, "resume_from_checkpoint=latest"]), "cpt").setup()
    again, code, _ = run("cpt", [*args, "resume_from_checkpoint=auto"])  # a sweep relaunched: nothing to do
    assert code == 0 and again.global_step == step and len(run_dir.list_checkpoints(out)) == 1
    raised, code, _ = run("cpt", [*args, "resume_from_checkpoint=latest", "max_tokens=3000"])
    assert code == 0 and raised.global_step > step and stops(out)[-1]["reason"] == "max_tokens"


def test_an_hour_budget_counts_the_wall_clock_across_resumes(tiny_extended_dir, corpus, tmp_path) -> None:
    out = tmp_path / "run"
    args = overrides("cpt", tiny_extended_dir, corpus, out, *LORA, "max_steps=50", "save_steps=100", "max_hours=1e-7")
    recipe, code, _ = run("cpt", args)
    assert code == 0 and recipe.global_step == 1
    assert stops(out)[-1]["reason"] == "max_hours" and stops(out)[-1]["hours"] > 1e-7
    raised = [*args, "resume_from_checkpoint=latest", "max_hours=1"]
    resumed, code, _ = run("cpt", [*raised, "max_steps=50"])
    assert code == 0 and resumed.global_step == 50 and stops(out)[-1]["reason"] == "max_steps"
    assert resumed.totals["wall_seconds"] > recipe.totals["wall_seconds"]  # summed over both attempts


def test_the_lr_schedule_spans_the_budget_that_binds_first(tiny_extended_dir, corpus, tmp_path) -> None:
    out = tmp_path / "run"
    args = overrides(
        "cpt", tiny_extended_dir, corpus, out, *LORA, "max_steps=1000", "save_steps=2", "max_tokens=4000",
        "lr_scheduler.span=budget", "lr_scheduler.num_warmup_steps=2",
    )  # fmt: skip
    recipe, code, _ = run("cpt", args)
    assert code == 0 and stops(out)[-1]["reason"] == "max_tokens"
    at_two = torch.load(
        run_dir.training_state_dir(checkpoint(out, 2)) / run_dir.TRAINING_STATE_FILE, weights_only=False
    )
    tokens_per_step = at_two["totals"]["tokens"] / 2
    span = at_two["lr_scheduler"]["lr_lambdas"][0]["span"]
    assert span == pytest.approx(4000 / tokens_per_step, abs=1)  # decided at the end of warmup
    assert abs(span - recipe.global_step) <= 0.25 * span  # the budget ended training about where the schedule did
    lrs = [float(metrics(out)[s]["lr"]) for s in sorted(metrics(out))]
    assert lrs[-1] < 0.1 * max(lrs)  # decayed to (almost) zero by the end of the budget


@pytest.mark.slow
def test_a_lora_rank_sweep_and_a_full_run_in_one_report(tiny_extended_dir, corpus, lora_run, tmp_path) -> None:
    import csv

    from ssi.report.cli import main as report_main

    root = tmp_path / "sweep"
    cell = [a for a in overrides("cpt", tiny_extended_dir, corpus, root, *LORA) if not a.startswith("output_dir=")]
    sweep = [sys.executable, str(REPO / "recipes/cpt.py"), "-m", f"hydra.sweep.dir={root}", *cell]
    done = subprocess.run(
        [*sweep, "max_steps=2", "save_steps=2", "eval_steps=2", "lora.rank=2,4"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    full = tmp_path / "full"
    run("cpt", overrides("cpt", tiny_extended_dir, corpus, full, "max_steps=2", "save_steps=2", "eval_steps=2"))
    assert report_main([str(root), str(full), "--output", str(tmp_path / "report")]) == 0
    with (tmp_path / "report/report.csv").open() as f:
        rows = {Path(r["run_dir"]).name: r for r in csv.DictReader(f)}
    assert {name: (r["trainable"], r["lora.rank"]) for name, r in rows.items()} == {
        "lora.rank-2": ("lora", "2"),
        "lora.rank-4": ("lora", "4"),
        "full": ("full", ""),  # a full run reads no lora.* setting
    }


def test_sft_with_lora_and_generation_from_its_merged_checkpoint(tiny_extended_dir, corpus, tmp_path) -> None:
    from ssi.generate.pipeline import run_generation

    out = tmp_path / "sft"
    _, code, _ = run("sft", overrides("sft", tiny_extended_dir, corpus, out, *LORA, "max_steps=3", "save_steps=3"))
    assert code == 0 and (checkpoint(out, 3) / "adapter/adapter_config.json").is_file()
    gen = make_cfg("generate", [f"model={out}", "backend=torch", "progress=false", "sampling_params.max_tokens=6"])
    record = run_generation(gen)  # model=<run>: its final checkpoint, merged, as any other
    wer = json.loads((Path(record["output_dir"]) / run_dir.WER_FILE).read_text())
    assert wer["n_utterances"] == 16


def test_a_full_training_checkpoint_does_not_resume_as_lora(tiny_extended_dir, corpus, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    run("cpt", overrides("cpt", tiny_extended_dir, corpus, out, "max_steps=1", "save_steps=1"))
    args = overrides(
        "cpt",
        tiny_extended_dir,
        corpus,
        out,
        *LORA,
        "max_steps=2",
        "resume_from_checkpoint=latest",
        "force_resume=true",
    )
    assert run_recipe(make_cfg("cpt", args), "cpt") == 2
    assert "resume it with the trainable= it was trained with" in capsys.readouterr().err
