"""LoRA, freezing by name and budgets in the training recipe, on the tiny extended model.

The merged checkpoints are checked against the adapters' own arithmetic (W + scale B A, base rows bit-identical)
and against PEFT, which loads the exported adapter onto the extended base (tests/peft_reader.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ssi import run_dir
from ssi.data.config import build_dataset
from ssi.data.synthetic import SyntheticSpec, make_synthetic_dataset
from ssi.run_dir import read_metrics as metrics
from ssi.train.recipe import RecipeError, SpeechTrainingRecipe, run_recipe
from ssi.train.sampler import GlobalBatchSampler
from ssi.vocab.extend import extend_model_dir
from ssi.vocab.tiktoken import load_tokenizer

from .conftest import N_TEST_DSUS
from .test_train_recipe import make_cfg, overrides, recipe_cmd, run

REPO = Path(__file__).resolve().parents[1]
BASE_VOCAB = 2256  # the tiny tokenizer's vocabulary: the extension's rows start here
LORA = ["trainable=lora", "lora.rank=4", "lora.alpha=8", "optimizer.lr=1e-2"]
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# base, special and new (speech unit) ids: logits read back from a checkpoint are compared on these
TOKENS = [1, 5, 300, BASE_VOCAB + 2, BASE_VOCAB + 150, 17, BASE_VOCAB + 299, 2]
# compared runs: no warm-up (its first steps have a learning rate of 0), and a step more than the updates that
# count, since LoRA's A matrices have no gradient while B is still zero (step 1)
REAL_UPDATES = ["lr_scheduler.num_warmup_steps=0", "max_steps=4", "log_steps=1"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = SyntheticSpec(n_train=64, n_validation=16, n_test=16, n_units=N_TEST_DSUS, seed=3)
    return make_synthetic_dataset(tmp_path_factory.mktemp("lora-corpus") / "corpus", spec, progress=False)


@pytest.fixture(scope="module")
def lora_run(
    tiny_extended_dir: Path, corpus: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, float, float]:
    """12 LoRA steps (checkpoints at 6 and 12), the dev loss before training, and the trained model's dev loss
    with its adapters zeroed (the trained new rows alone)."""
    out = tmp_path_factory.mktemp("lora") / "run"
    args = overrides("cpt", tiny_extended_dir, corpus, out, *LORA, "max_steps=12", "save_steps=6", "eval_steps=12")
    recipe, code, initial = run("cpt", args, evaluate_first=True)
    assert code == 0
    with torch.no_grad():
        for name, param in recipe.model.named_parameters():
            if name.endswith("lora_b.weight"):
                param.zero_()
    return out, initial, recipe.evaluate()


def load_dir(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model directory, whatever its sharding."""
    return {k: v for path in sorted(model_dir.glob("*.safetensors")) for k, v in load_file(path).items()}


def checkpoint(run: Path, step: int) -> Path:
    (found,) = (run / "checkpoints").glob(f"epoch_*/global_step_{step}")
    return found


def adapters(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(checkpoint(run, step) / "adapter/adapter_model.safetensors")


def peft_difference(base: Path, ckpt: Path) -> dict[str, float]:
    tokens = json.dumps(TOKENS)
    done = subprocess.run(
        [sys.executable, str(REPO / "tests/peft_reader.py"), str(base), str(ckpt), tokens],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_lora_learns_and_the_merged_checkpoint_is_the_base_plus_scaled_adapters(tiny_extended_dir, lora_run) -> None:
    """The adapters take part in the learning, not only the new rows (which alone meet the first bound):
    zeroing them after training gives back a share of the dev loss's fall (3.9%, 0.05 nats, at 12 steps)."""
    out, initial, without_adapters = lora_run
    trained = float(metrics(out)[12]["dev_loss"])
    assert trained < 0.9 * initial
    assert without_adapters - trained > 0.02 * (initial - trained), (initial, trained, without_adapters)
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
    first = lora_run[0]
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
    """Three real updates of A and B; the gradient norm is compared too, since Adam's normalised update would
    hide a uniform scale error in the gradients (e.g. FSDP's average over ranks not undone)."""
    common = [*LORA, *REAL_UPDATES, "save_steps=4", "eval_steps=4"]
    run("cpt", overrides("cpt", tiny_extended_dir, corpus, tmp_path / "one", *common))
    two = overrides("cpt", tiny_extended_dir, corpus, tmp_path / "two", *common, "gradient_accumulation_steps=1")
    done = subprocess.run(recipe_cmd("cpt", two, nproc=2), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert_same_steps(a, b, loss=1e-4, grad_norm=1e-4)
    assert float(a[4]["dev_loss"]) == pytest.approx(float(b[4]["dev_loss"]), abs=1e-4)
    one, two = (adapters(tmp_path / r, 4) for r in ("one", "two"))
    for name in one:
        torch.testing.assert_close(one[name], two[name], rtol=0, atol=1e-4)


def assert_same_steps(a: dict[int, dict], b: dict[int, dict], loss: float, grad_norm: float) -> None:
    """Two runs' logged steps 1-4 (log_steps=1): the same loss (absolute) and gradient norm (relative), after
    updates that moved the loss far more than that."""
    assert float(a[4]["loss"]) < float(a[1]["loss"]) - 100 * loss  # the updates were real
    for step in range(1, 5):
        assert float(a[step]["loss"]) == pytest.approx(float(b[step]["loss"]), abs=loss), step
        assert float(a[step]["grad_norm"]) == pytest.approx(float(b[step]["grad_norm"]), rel=grad_norm), step


@pytest.mark.slow
def test_lora_with_packing_activation_checkpointing_and_compile(tiny_extended_dir, corpus, tmp_path) -> None:
    """Three real updates of A and B, the same losses and gradient norms with and without the faster paths."""
    common = [*LORA, *REAL_UPDATES, "save_steps=1000", "gradient_accumulation_steps=1", "data.packing.enabled=true"]
    run("cpt", overrides("cpt", tiny_extended_dir, corpus, tmp_path / "plain", *common))
    faster = ["enable_activation_checkpointing=true", "compile=true"]
    run("cpt", overrides("cpt", tiny_extended_dir, corpus, tmp_path / "compiled", *common, *faster))
    plain, compiled = metrics(tmp_path / "plain"), metrics(tmp_path / "compiled")
    assert_same_steps(plain, compiled, loss=1e-5, grad_norm=1e-4)
    one, two = (adapters(tmp_path / r, 4) for r in ("plain", "compiled"))
    for name in one:
        torch.testing.assert_close(one[name], two[name], rtol=0, atol=1e-5)


def test_bf16_mixed_precision_keeps_a_bf16_base_in_bf16(untied_base_dir, corpus, tmp_path) -> None:
    """Frozen weights stay bf16 and trained ones fp32; the checkpoint, as transformers reads it by default,
    computes the logits of the trained model in memory (the merge is written in fp32: bf16 would round the
    adapters' deltas away)."""
    from transformers import AutoModelForCausalLM

    base = extend_model_dir(untied_base_dir, tmp_path / "extended", N_TEST_DSUS, progress=False)
    args = overrides("cpt", base, corpus, tmp_path / "run", *LORA, "max_steps=2", "save_steps=2", "dtype=bf16")
    recipe, code, _ = run("cpt", args)
    assert code == 0
    dtypes = {(p.requires_grad, p.dtype) for p in recipe.model.parameters()}
    assert dtypes == {(False, torch.bfloat16), (True, torch.float32)}  # frozen as stored, trained in fp32
    ckpt = checkpoint(tmp_path / "run", 2)
    before, after = load_dir(base), load_dir(ckpt)
    for name in before:
        if "norm" in name:
            assert torch.equal(after[name], before[name]), name
    tokens = torch.tensor([TOKENS])
    recipe.model.set_num_output_chunks(0)
    with torch.no_grad():
        trained = recipe.model.float().eval()(tokens)[0]  # the trained weights, exactly (bf16 -> fp32 is exact)
        read = AutoModelForCausalLM.from_pretrained(ckpt).eval()(tokens).logits[0].float()
        start = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()(tokens).logits[0]
    off = float((read - trained).norm() / (trained - start).norm())  # a share of the change training made
    assert off < 1e-3, off


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


def positions_after_each_step(args: list[str], model: Path, steps: int) -> list[int]:
    """The running total of non-padding positions after each of the first `steps` steps, counted here: the
    lengths of the samples that the sampler's order puts in each global batch of 8 (4 x 2 accumulation)."""
    cfg = make_cfg("cpt", args)
    dataset = build_dataset(cfg.data, "train", load_tokenizer(model)).dataset
    sampler = GlobalBatchSampler(len(dataset), 4, 2, seed=int(cfg.seed))
    totals, total = [], 0
    for step in range(steps):
        epoch, within = divmod(step, sampler.steps_per_epoch)
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        for index in sampler.epoch_order()[within * 8 : (within + 1) * 8]:
            total += len(dataset[index]["tokens"])
        totals.append(total)
    return totals


def test_a_token_budget_stops_with_a_checkpoint_and_a_stopped_run_refuses_to_go_on(
    tiny_extended_dir, corpus, tmp_path
) -> None:
    """The run stops at the first step boundary at or past max_tokens, having counted every non-padding
    position and nothing else; raised, the budget goes on from the checkpoint's count."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    args = overrides("cpt", tiny_extended_dir, corpus, out, *LORA, "max_steps=50", "save_steps=100", "log_steps=1")
    counted = positions_after_each_step(args, tiny_extended_dir, 5)
    budget = counted[2]  # exactly the total after step 3: `>=` stops there, `>` a step later
    recipe, code, _ = run("cpt", [*args, f"max_tokens={budget}"])
    assert code == 0 and recipe.global_step == 3 and recipe.totals["tokens"] == budget
    logged = metrics(out)
    assert [logged[step]["consumed_tokens"] for step in (1, 2, 3)] == counted[:3]
    assert stops(out)[-1] == {**stops(out)[-1], "reason": "max_tokens", "step": 3, "tokens": budget}
    ckpt = checkpoint(out, 3)
    saved = torch.load(run_dir.training_state_dir(ckpt) / run_dir.TRAINING_STATE_FILE, weights_only=False)
    assert saved["stop_reason"] == "max_tokens" and saved["totals"]["tokens"] == budget
    AutoModelForCausalLM.from_pretrained(ckpt)  # a complete model directory

    stopped = [*args, f"max_tokens={budget}"]
    with pytest.raises(RecipeError, match=rf"ended its run on max_tokens={budget}: raise max_tokens to train further"):
        SpeechTrainingRecipe(make_cfg("cpt", [*stopped, "resume_from_checkpoint=latest"]), "cpt").setup()
    again, code, _ = run("cpt", [*stopped, "resume_from_checkpoint=auto"])  # a sweep relaunched: nothing to do
    assert code == 0 and again.global_step == 3 and len(run_dir.list_checkpoints(out)) == 1
    raised = counted[4] - 1  # between the totals after steps 4 and 5, counted from the run's start
    again, code, _ = run("cpt", [*args, "resume_from_checkpoint=latest", f"max_tokens={raised}"])
    assert code == 0 and again.global_step == 5 and again.totals["tokens"] == counted[4]
    assert stops(out)[-1]["reason"] == "max_tokens"
    assert [metrics(out)[step]["consumed_tokens"] for step in (4, 5)] == counted[3:]


def test_an_hour_budget_counts_the_wall_clock_across_resumes(tiny_extended_dir, corpus, tmp_path) -> None:
    """An attempt that has run an hour stops at its first step boundary; a resume with a budget just above
    that attempt's total stops at its own first step boundary, with both attempts' wall clocks summed."""
    out = tmp_path / "run"
    args = overrides("cpt", tiny_extended_dir, corpus, out, *LORA, "max_steps=4", "save_steps=100")
    first = SpeechTrainingRecipe(make_cfg("cpt", [*args, "max_hours=1"]), "cpt")
    first.setup()
    first.t_setup -= 3600  # as if its set-up had begun an hour ago
    try:
        assert first.train() == 0
    finally:
        first.cleanup()
    hour = first.totals["wall_seconds"]
    assert first.global_step == 1 and stops(out)[-1]["reason"] == "max_hours" and hour >= 3600
    just_above = (hour + 1e-3) / 3600
    started = time.monotonic()
    resumed, code, _ = run("cpt", [*args, f"max_hours={just_above!r}", "resume_from_checkpoint=latest"])
    own = time.monotonic() - started  # this attempt's wall clock, at most
    assert code == 0 and resumed.global_step == 2 and stops(out)[-1]["reason"] == "max_hours"
    assert hour + 1e-3 <= resumed.totals["wall_seconds"] <= hour + own
    assert stops(out)[-1]["hours"] == resumed.totals["wall_seconds"] / 3600


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
