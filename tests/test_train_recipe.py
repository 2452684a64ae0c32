"""The CPT/SFT recipes on the tiny model: learning, checkpoints, exact resume, distributed, preemption."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

from ssi.data.synthetic import SyntheticSpec, make_synthetic_dataset
from ssi.run_dir import read_metrics as metrics
from ssi.train.preemption import StopSignals
from ssi.train.recipe import EXIT_PREEMPTED, RecipeError, SpeechTrainingRecipe, run_recipe

from .conftest import N_TEST_DSUS

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = SyntheticSpec(n_train=64, n_validation=16, n_test=16, n_units=N_TEST_DSUS, seed=3)
    return make_synthetic_dataset(tmp_path_factory.mktemp("train-corpus") / "corpus", spec, progress=False)


def overrides(kind: str, model_dir: Path, corpus: Path, out: Path, *extra: str) -> list[str]:
    return [
        "size=tiny",
        f"data={kind}/synthetic",
        f"data.train.dataset.source={corpus}",
        f"model={model_dir}",
        f"output_dir={out}",
        "progress=false",
        "data.train.dataloader.batch_size=4",
        "gradient_accumulation_steps=2",
        "lr_scheduler.num_warmup_steps=2",
        "optimizer.lr=1e-3",
        *extra,
    ]


def make_cfg(name: str, args: list[str]):
    """The config `conf/<name>.yaml` with these overrides, composed as the scripts' Hydra entry points do."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return compose(config_name=name, overrides=args)


def run(kind: str, args: list[str], evaluate_first: bool = False) -> tuple[SpeechTrainingRecipe, int, float | None]:
    """Set up and train in this process; returns the recipe, the exit code and the dev loss before training."""
    recipe = SpeechTrainingRecipe(make_cfg(kind, args), kind)
    recipe.setup()
    initial = recipe.evaluate() if evaluate_first else None
    try:
        code = recipe.train()
    finally:
        recipe.cleanup()
    return recipe, code, initial


def final_weights(run_dir: Path, step: int) -> bytes:
    (ckpt,) = (run_dir / "checkpoints").glob(f"epoch_*/global_step_{step}")
    return (ckpt / "model.safetensors").read_bytes()


@pytest.mark.slow
def test_cpt_learns_and_checkpoint_loads_in_transformers(tiny_extended_dir, corpus, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    args = overrides(
        "cpt",
        tiny_extended_dir,
        corpus,
        tmp_path / "run",
        "max_steps=120",
        "save_steps=60",
        "eval_steps=60",
        "optimizer.lr=3e-3",
        "gradient_accumulation_steps=1",
    )
    recipe, code, initial = run("cpt", args, evaluate_first=True)
    assert code == 0
    logged = metrics(tmp_path / "run")
    final = float(logged[120]["dev_loss"])
    assert final < 0.6 * initial, (initial, final)
    for key in ("loss", "lr", "grad_norm", "tokens_per_second", "samples_per_second", "dsu_tokens", "padding_tokens"):
        assert key in logged[60], key
    assert int(logged[120]["consumed_samples"]) == 120 * 4

    ckpt = tmp_path / "run/checkpoints/epoch_7/global_step_120"
    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    tokens = torch.randint(0, recipe.vocab.vocab_size, (2, 33), generator=torch.Generator().manual_seed(1))
    recipe.model.set_num_output_chunks(0)
    with torch.no_grad():
        ours = recipe.model(tokens)
        theirs = hf(tokens).logits
    # two fp32 implementations summing in different orders: ~1e-5 apart on trained logits; a wrong weight or
    # RoPE layout is off by O(1)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    assert (tmp_path / "run/torchtune_config.yaml").is_file()


@pytest.mark.slow
def test_sft_learns_the_transcript(tiny_extended_dir, corpus, tmp_path) -> None:
    args = overrides(
        "sft",
        tiny_extended_dir,
        corpus,
        tmp_path / "run",
        "max_steps=100",
        "save_steps=100",
        "eval_steps=100",
        "optimizer.lr=3e-3",
        "gradient_accumulation_steps=1",
        "data.sequence.dedup=true",
    )
    _, code, initial = run("sft", args, evaluate_first=True)
    assert code == 0
    assert float(metrics(tmp_path / "run")[100]["dev_loss"]) < 0.5 * initial


@pytest.mark.parametrize("save_dtype", ["null", "bf16"], ids=["saved-as-trained", "fp32-master-bf16-saved"])
def test_resume_is_bit_identical_mid_epoch_with_accumulation(tiny_extended_dir, corpus, tmp_path, save_dtype) -> None:
    # 64 samples / global batch 8 = 8 steps per epoch: step 5 is mid-epoch, step 12 is in the next epoch.
    # Weights saved in bf16 from fp32 training: the fp32 master copy in training_state/ makes resume exact.
    common = ["max_steps=12", "save_steps=5", "eval_steps=100", f"checkpointer.save_dtype={save_dtype}"]
    run("cpt", overrides("cpt", tiny_extended_dir, corpus, tmp_path / "a", *common))
    checkpoint = tmp_path / "a/checkpoints/epoch_0/global_step_5"
    run(
        "cpt",
        overrides("cpt", tiny_extended_dir, corpus, tmp_path / "b", *common, f"resume_from_checkpoint={checkpoint}"),
    )
    a, b = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    assert sorted(b) == list(range(6, 13))
    for step in range(6, 13):
        assert a[step]["loss"] == b[step]["loss"], step
        assert a[step]["grad_norm"] == b[step]["grad_norm"], step
    assert final_weights(tmp_path / "a", 12) == final_weights(tmp_path / "b", 12)
    assert (checkpoint / "training_state/master_weights.safetensors").is_file() == (save_dtype == "bf16")


def test_resume_refuses_changed_settings_unless_forced(tiny_extended_dir, corpus, tmp_path) -> None:
    out = tmp_path / "run"
    run("cpt", overrides("cpt", tiny_extended_dir, corpus, out, "max_steps=2", "save_steps=2"))
    again = overrides("cpt", tiny_extended_dir, corpus, out, "max_steps=4", "save_steps=2")
    with pytest.raises(RecipeError, match="already has checkpoints: pass resume_from_checkpoint=latest"):
        SpeechTrainingRecipe(make_cfg("cpt", again), "cpt").setup()
    changed = [*again, "resume_from_checkpoint=latest", "optimizer.lr=0.5"]
    with pytest.raises(RecipeError, match=r"different settings \(optimizer: .*'lr': 0.001.*'lr': 0.5.*force_resume"):
        SpeechTrainingRecipe(make_cfg("cpt", changed), "cpt").setup()
    _, code, _ = run("cpt", [*changed, "force_resume=true"])
    assert code == 0 and 4 in metrics(out)
    plot = subprocess.run([sys.executable, str(REPO / "scripts/plot_losses.py"), str(out), "--output",
                           str(tmp_path / "losses.png")], capture_output=True, text=True)  # fmt: skip
    assert plot.returncode == 0, plot.stderr
    assert (tmp_path / "losses.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = subprocess.run([sys.executable, str(REPO / "scripts/plot_losses.py"), str(out), "--output",
                            str(tmp_path / "losses.png")], capture_output=True, text=True)  # fmt: skip
    assert again.returncode == 2 and "exists; pass --overwrite" in again.stderr


def test_new_embeddings_mode_leaves_everything_else_bit_identical(tiny_extended_dir, corpus, tmp_path) -> None:
    run(
        "cpt",
        overrides(
            "cpt",
            tiny_extended_dir,
            corpus,
            tmp_path / "run",
            "max_steps=4",
            "save_steps=4",
            "trainable=new_embeddings",
            "optimizer.lr=1e-2",
        ),
    )
    before = load_file(tiny_extended_dir / "model.safetensors")
    (ckpt,) = (tmp_path / "run/checkpoints").glob("epoch_*/global_step_4")
    after = load_file(ckpt / "model.safetensors")
    assert before.keys() == after.keys()
    for name in before:
        if name != "model.embed_tokens.weight":
            assert torch.equal(before[name], after[name]), name
    base = 2256
    emb_before, emb_after = before["model.embed_tokens.weight"], after["model.embed_tokens.weight"]
    assert torch.equal(emb_before[:base], emb_after[:base])
    assert not torch.equal(emb_before[base:], emb_after[base:])


def test_text_dev_loss_watches_forgetting(tiny_extended_dir, corpus, tmp_path, capsys) -> None:

    texts = tmp_path / "text.jsonl"
    texts.write_text("".join(json.dumps({"text": f"the cat sat on mat number {i}."}) + "\n" for i in range(10)))
    args = overrides(
        "cpt",
        tiny_extended_dir,
        corpus,
        tmp_path / "run",
        "max_steps=2",
        "save_steps=2",
        "eval_steps=1",
        f"text_dev.source={texts}",
        "text_dev.split=train",
    )
    run("cpt", args)
    logged = metrics(tmp_path / "run")
    assert 5.0 < logged[1]["text_dev_loss"] < 10.0 and "dev_loss" in logged[2]
    bad = overrides(
        "cpt",
        tiny_extended_dir,
        corpus,
        tmp_path / "bad",
        f"text_dev.source={texts}",
        "text_dev.split=train",
        "text_dev.column=content",
    )
    assert run_recipe(make_cfg("cpt", bad), "cpt") == 2
    assert "no column 'content'; available columns: ['text']" in capsys.readouterr().err


def test_packed_training_runs(tiny_extended_dir, corpus, tmp_path) -> None:
    args = overrides(
        "cpt",
        tiny_extended_dir,
        corpus,
        tmp_path / "run",
        "max_steps=3",
        "save_steps=3",
        "data.packing.enabled=true",
        "data.sequence.max_seq_len=256",
    )
    _, code, _ = run("cpt", args)
    logged = metrics(tmp_path / "run")
    assert code == 0 and all(float(logged[s]["loss"]) > 0 for s in (1, 2, 3))
    assert int(logged[1]["padding_tokens"]) < int(logged[1]["dsu_tokens"])


def test_window_without_label_tokens_is_skipped(tiny_extended_dir, corpus, tmp_path, caplog) -> None:
    # SFT truncated to 8 tokens keeps only the masked prompt: no token carries a label
    args = overrides(
        "sft", tiny_extended_dir, corpus, tmp_path / "run", "max_steps=2", "save_steps=2", "data.sequence.max_seq_len=8"
    )
    with caplog.at_level(logging.WARNING, logger="ssi.train.recipe"):
        recipe, code, _ = run("sft", args)
    assert code == 0 and recipe.totals["skipped_steps"] == 2
    assert "no label tokens in the accumulation window: skipping the update" in caplog.text


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["model=???"], "missing required setting model"),
        (["model=/nonexistent/model"], "model=/nonexistent/model is not a directory"),
        (["checkpointer.checkpoint_dir=/nonexistent/ckpt"], "model=/nonexistent/ckpt is not a directory"),  # alias
        (["model=tiny"], "size presets are chosen with size=tiny"),
        (["data.train.dataset.source=/nonexistent/corpus"], "/nonexistent/corpus"),
        (["data.encoder.n_units=500"], "500"),
    ],
)
def test_config_errors_are_clear(tiny_extended_dir, corpus, tmp_path, capsys, extra, message) -> None:
    args = overrides("cpt", tiny_extended_dir, corpus, tmp_path / "run", "max_steps=1", *extra)
    assert run_recipe(make_cfg("cpt", args), "cpt") == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_recipe_refuses_a_preset_of_the_other_kind(tiny_extended_dir, corpus, tmp_path) -> None:
    args = overrides("cpt", tiny_extended_dir, corpus, tmp_path / "run")
    with pytest.raises(RecipeError, match="the sft recipe needs data=sft/<preset>, got a cpt preset"):
        SpeechTrainingRecipe(make_cfg("sft", args), "sft")


def test_manifest_mismatch_is_refused(tiny_extended_dir, corpus, tmp_path, capsys) -> None:
    import shutil

    broken = tmp_path / "model"
    shutil.copytree(tiny_extended_dir, broken)
    manifest = json.loads((broken / "ssi.json").read_text())
    (broken / "ssi.json").write_text(json.dumps({**manifest, "n_dsus": 200, "vocab_size": 2458}))
    assert run_recipe(make_cfg("cpt", overrides("cpt", broken, corpus, tmp_path / "run")), "cpt") == 2
    assert "disagrees with" in capsys.readouterr().err


# --- subprocess tiers: torchrun and signals --------------------------------------------------------------


def free_port() -> int:
    """A TCP port nothing listens on now (the OS picks it), for torchrun's rendezvous: tests run in parallel."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def recipe_cmd(kind: str, args: list[str], nproc: int = 1) -> list[str]:
    if nproc == 1:
        return [sys.executable, str(REPO / f"recipes/{kind}.py"), *args]
    port = str(free_port())
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_port",
        port,
        str(REPO / f"recipes/{kind}.py"),
        *args,
    ]


@pytest.mark.slow
def test_two_processes_match_one_and_resume_across_world_sizes(tiny_extended_dir, corpus, tmp_path) -> None:
    one = overrides("cpt", tiny_extended_dir, corpus, tmp_path / "one", "max_steps=6", "save_steps=3", "eval_steps=3")
    run("cpt", one)
    # the same global batch of 8: 4 per rank x 1 accumulation step x 2 ranks
    two = overrides(
        "cpt",
        tiny_extended_dir,
        corpus,
        tmp_path / "two",
        "max_steps=6",
        "save_steps=3",
        "eval_steps=3",
        "gradient_accumulation_steps=1",
    )
    subprocess.run(recipe_cmd("cpt", two, nproc=2), check=True, capture_output=True)
    a, b = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    for step in range(1, 7):
        assert float(a[step]["loss"]) == pytest.approx(float(b[step]["loss"]), abs=1e-4), step
    assert float(a[6]["dev_loss"]) == pytest.approx(float(b[6]["dev_loss"]), abs=1e-4)

    # a 2-process checkpoint continues in 1 process, and a 1-process checkpoint in 2 processes
    resume = "resume_from_checkpoint={}/checkpoints/epoch_0/global_step_3"
    from_two = overrides(
        "cpt",
        tiny_extended_dir,
        corpus,
        tmp_path / "from_two",
        "max_steps=6",
        "save_steps=3",
        "eval_steps=3",
        resume.format(tmp_path / "two"),
    )
    run("cpt", from_two)
    from_one = overrides(
        "cpt",
        tiny_extended_dir,
        corpus,
        tmp_path / "from_one",
        "max_steps=6",
        "save_steps=3",
        "eval_steps=3",
        "gradient_accumulation_steps=1",
        resume.format(tmp_path / "one"),
    )
    subprocess.run(recipe_cmd("cpt", from_one, nproc=2), check=True, capture_output=True)
    for resumed in ("from_two", "from_one"):
        c = metrics(tmp_path / resumed)
        for step in range(4, 7):
            assert float(c[step]["loss"]) == pytest.approx(float(a[step]["loss"]), abs=1e-4), (resumed, step)


@pytest.mark.slow
@pytest.mark.parametrize("trainable", ["full", "lora"])
def test_sigusr1_checkpoints_exits_for_requeue_and_resumes_exactly(
    tiny_extended_dir, corpus, tmp_path, trainable
) -> None:
    common = ["max_steps=30", "save_steps=1000", "eval_steps=1000", f"trainable={trainable}"]
    run("cpt", overrides("cpt", tiny_extended_dir, corpus, tmp_path / "reference", *common))
    out = tmp_path / "preempted"
    args = overrides("cpt", tiny_extended_dir, corpus, out, *common)
    proc = subprocess.Popen(recipe_cmd("cpt", args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and 3 not in (metrics(out) if (out / "logs").is_dir() else {}):
        time.sleep(0.2)
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=120) == EXIT_PREEMPTED
    (stopped,) = (out / "checkpoints").glob("epoch_*/global_step_*")
    stopped_step = int(stopped.name.removeprefix("global_step_"))
    assert 3 <= stopped_step < 30
    resumed = subprocess.run(recipe_cmd("cpt", [*args, "resume_from_checkpoint=latest"]), capture_output=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert final_weights(out, 30) == final_weights(tmp_path / "reference", 30)
    reasons = [json.loads(line)["reason"] for line in (out / "logs/stops.jsonl").read_text().splitlines()]
    assert reasons == ["signal", "max_steps"]


@pytest.mark.slow
def test_packed_two_processes_cross_epochs_without_hanging(tiny_extended_dir, corpus, tmp_path) -> None:
    # ranks pack different numbers of rows; each epoch must end on every rank at the same step
    args = overrides(
        "cpt",
        tiny_extended_dir,
        corpus,
        tmp_path / "run",
        "max_steps=30",
        "save_steps=1000",
        "data.packing.enabled=true",
        "data.sequence.max_seq_len=512",
        "gradient_accumulation_steps=1",
    )
    done = subprocess.run(recipe_cmd("cpt", args, nproc=2), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    logged = metrics(tmp_path / "run")
    assert sorted(logged) == list(range(1, 31)) and logged[30]["epoch"] >= 2


@pytest.mark.slow
def test_activation_checkpointing_and_compile_train_the_same_model(tiny_extended_dir, corpus, tmp_path) -> None:
    common = ["max_steps=3", "save_steps=1000", "gradient_accumulation_steps=1"]
    run("cpt", overrides("cpt", tiny_extended_dir, corpus, tmp_path / "plain", *common))
    run(
        "cpt",
        overrides("cpt", tiny_extended_dir, corpus, tmp_path / "ac", *common, "enable_activation_checkpointing=true"),
    )
    run("cpt", overrides("cpt", tiny_extended_dir, corpus, tmp_path / "compiled", *common, "compile=true"))
    plain, ac, compiled = (metrics(tmp_path / name) for name in ("plain", "ac", "compiled"))
    for step in (1, 2, 3):
        assert ac[step]["loss"] == plain[step]["loss"]  # recomputation repeats the same arithmetic
        assert compiled[step]["loss"] == pytest.approx(plain[step]["loss"], abs=1e-5)


def test_linear_cross_entropy_matches_chunked(tiny_extended_dir, corpus, tmp_path) -> None:
    common = ["max_steps=3", "save_steps=1000", "eval_steps=3"]
    run("cpt", overrides("cpt", tiny_extended_dir, corpus, tmp_path / "chunked", *common))
    run("cpt", overrides("cpt", tiny_extended_dir, corpus, tmp_path / "linear", *common, "loss.type=linear"))
    chunked, linear = metrics(tmp_path / "chunked"), metrics(tmp_path / "linear")
    for step in (1, 2, 3):
        assert linear[step]["loss"] == pytest.approx(chunked[step]["loss"], abs=1e-5)
    assert linear[3]["dev_loss"] == pytest.approx(chunked[3]["dev_loss"], abs=1e-5)
    with pytest.raises(RecipeError, match="loss.type must be 'chunked' or 'linear', got 'fused'"):
        SpeechTrainingRecipe(
            make_cfg("cpt", overrides("cpt", tiny_extended_dir, corpus, tmp_path / "x", "loss.type=fused")), "cpt"
        ).setup()


def test_auto_resume_starts_or_continues_and_a_run_directory_as_model_is_its_newest_checkpoint(
    tiny_extended_dir, corpus, tmp_path
) -> None:
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)}
    cpt = overrides("cpt", tiny_extended_dir, corpus, tmp_path / "cpt", "max_steps=2", "save_steps=1")
    _, code, _ = run("cpt", [*cpt, "resume_from_checkpoint=auto"])  # nothing to resume: a fresh start
    assert code == 0 and sorted(metrics(tmp_path / "cpt")) == [1, 2]
    recipe, code, _ = run("cpt", [*cpt, "resume_from_checkpoint=auto"])  # launched again: continues, done
    assert code == 0 and recipe.global_step == 2
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers  # each run puts the handlers back

    sft = overrides("sft", tmp_path / "cpt", corpus, tmp_path / "sft", "max_steps=1", "save_steps=1")
    recipe, code, _ = run("sft", sft)
    newest = tmp_path / "cpt/checkpoints/epoch_0/global_step_2"
    assert code == 0 and recipe.cfg.model == str(newest)
    assert f"model: {newest}" in (tmp_path / "sft/torchtune_config.yaml").read_text()
    empty = tmp_path / "empty-run"
    empty.mkdir()
    (empty / "torchtune_config.yaml").write_text("model: x\n")
    with pytest.raises(RecipeError, match=f"model={empty} is a run directory without a complete checkpoint"):
        SpeechTrainingRecipe(make_cfg("sft", overrides("sft", empty, corpus, tmp_path / "x")), "sft").setup()


def test_a_stop_signal_is_handed_to_the_handler_it_replaced_after_the_checkpoint() -> None:
    seen: list[int] = []
    before = signal.signal(signal.SIGUSR2, lambda signum, _frame: seen.append(signum))  # e.g. submitit's requeue
    try:
        stop = StopSignals()
        stop.install()
        os.kill(os.getpid(), signal.SIGUSR2)
        assert stop.received == signal.SIGUSR2 and seen == []  # first the run stops and saves
        stop.restore()
        stop.hand_over()
        assert seen == [signal.SIGUSR2]
        plain = StopSignals()  # SIGUSR1 had no Python handler: the process exits with EXIT_PREEMPTED instead
        plain.install()
        os.kill(os.getpid(), signal.SIGUSR1)
        plain.restore()
        plain.hand_over()
        assert plain.received == signal.SIGUSR1 and seen == [signal.SIGUSR2]
    finally:
        signal.signal(signal.SIGUSR2, before)
