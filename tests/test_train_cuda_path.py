"""The CUDA training path, checked on a CPU-only machine: device discipline, precision, FSDP2 details.

Each test reproduces a defect that a first GPU run would otherwise find (crash, hang, silent CPU
training or silently wrong weights) with what a CPU can show: `DeviceDiscipline` enforces CUDA's
same-device rule, gloo runs FSDP2 across two processes, and bf16 arithmetic is the same on every device.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ssi import devices as distributed
from ssi.data.config import build_dataset
from ssi.data.packing import PackedDataset
from ssi.model.builder import build_model
from ssi.run_dir import read_metrics as metrics
from ssi.train import throughput as flops
from ssi.train.recipe import SpeechTrainingRecipe, run_recipe
from ssi.vocab.tiktoken import load_tokenizer

from .device_check import DeviceDiscipline, DeviceMixError
from .test_train_recipe import corpus, make_cfg, overrides, recipe_cmd, run  # noqa: F401 (corpus is a fixture)

BASE_VOCAB = 2256  # the tiny test model: 2,000 BPE ranks + 256 Llama 3 specials


# --- every tensor on the model's device -----------------------------------------------------------------


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["data.packing.enabled=true", "data.sequence.max_seq_len=256"],
        ["loss.type=linear"],
        ["trainable=new_embeddings"],
    ],
    ids=["padded", "packed", "linear-loss", "new-embeddings"],
)
def test_training_and_evaluation_keep_tensors_on_the_model_device(
    tiny_extended_dir,
    corpus,  # noqa: F811
    tmp_path,
    extra,
) -> None:
    args = overrides(
        "cpt",
        tiny_extended_dir,
        corpus,
        tmp_path / "run",
        "max_steps=2",
        "save_steps=2",
        "eval_steps=1",
        "data.dev.dataset.n_samples=8",
        *extra,
    )
    recipe = SpeechTrainingRecipe(make_cfg("cpt", args), "cpt")
    try:
        # from the start: the model, its masks and optimizer state are created where the recipe puts them
        with DeviceDiscipline(torch.device("cpu"), []) as check:
            recipe.setup()
            assert recipe.train() == 0
    finally:
        recipe.cleanup()
    assert check.checked_ops > 500  # forward, backward, optimizer and evaluation all ran under the check
    assert "dev_loss" in metrics(tmp_path / "run")[2]


def test_device_discipline_refuses_what_cuda_refuses() -> None:
    model = torch.nn.Linear(4, 4)
    with DeviceDiscipline(torch.device("cpu"), [model]):
        out = model(torch.ones(2, 4).to("cpu"))  # moved explicitly: fine
        scalar = out.sum() * torch.tensor(2.0)  # a 0-dim host tensor may be read by a GPU kernel
        host_accumulator = torch.zeros(())
        with pytest.raises(DeviceMixError, match="writes a host tensor"):
            host_accumulator += scalar.detach()
        with pytest.raises(DeviceMixError, match="mixes a host tensor"):
            model(torch.ones(2, 4))  # never moved to the device


# --- precision ------------------------------------------------------------------------------------------


def _updates(run_dir: Path, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    (ckpt,) = run_dir.glob("checkpoints/epoch_*/global_step_3")
    after = load_file(ckpt / "model.safetensors")
    return {name: after[name] - base[name] for name in base}


def test_bf16_mixed_precision_updates_like_fp32_and_pure_bf16_loses_small_updates(
    tiny_extended_dir,
    corpus,  # noqa: F811
    tmp_path,
) -> None:
    # the SFT default lr: 5e-5 moves a weight of magnitude 1 by far less than bf16's spacing there (0.0078)
    common = ["max_steps=3", "save_steps=3", "optimizer.lr=5e-5", "lr_scheduler.num_warmup_steps=0"]
    common += ["gradient_accumulation_steps=1", "checkpointer.save_dtype=fp32"]
    settings = {"fp32": ["dtype=fp32"], "mixed": ["dtype=bf16"], "pure": ["dtype=bf16", "mixed_precision=false"]}
    for name, extra in settings.items():
        run("sft", overrides("sft", tiny_extended_dir, corpus, tmp_path / name, *common, *extra))
    base = load_file(tiny_extended_dir / "model.safetensors")
    reference = _updates(tmp_path / "fp32", base)
    mixed = _updates(tmp_path / "mixed", base)
    norms = [name for name in base if name.endswith("norm.weight")]
    assert norms
    for name, delta in reference.items():
        cosine = torch.nn.functional.cosine_similarity(delta.flatten(), mixed[name].flatten(), dim=0)
        assert cosine > 0.95, (name, float(cosine))
        assert bool((mixed[name] != 0).all()) == bool((delta != 0).all()), name
    for name in norms:
        assert (mixed[name] != 0).all(), name  # every RMSNorm weight moves, as in fp32
    pure = load_file(next((tmp_path / "pure").glob("checkpoints/epoch_*/global_step_3")) / "model.safetensors")
    for name in norms:
        assert torch.equal(pure[name], base[name].bfloat16().float()), name  # none moves in pure bf16


# --- FSDP2 on two processes -----------------------------------------------------------------------------


@pytest.mark.slow
def test_new_embeddings_under_fsdp_keep_base_rows_bit_identical(
    tiny_extended_dir,
    corpus,  # noqa: F811
    tmp_path,
) -> None:
    args = overrides(
        "cpt",
        tiny_extended_dir,
        corpus,
        tmp_path / "run",
        "max_steps=4",
        "save_steps=4",
        "trainable=new_embeddings",
        "optimizer.lr=1e-2",
        "gradient_accumulation_steps=1",
    )
    done = subprocess.run(recipe_cmd("cpt", args, nproc=2), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    before = load_file(tiny_extended_dir / "model.safetensors")
    after = load_file(next((tmp_path / "run/checkpoints").glob("epoch_*/global_step_4")) / "model.safetensors")
    for name in before:
        if name != "model.embed_tokens.weight":
            assert torch.equal(before[name], after[name]), name
    embedding_before, embedding_after = before["model.embed_tokens.weight"], after["model.embed_tokens.weight"]
    assert torch.equal(embedding_before[:BASE_VOCAB], embedding_after[:BASE_VOCAB])
    assert (embedding_before[BASE_VOCAB:] != embedding_after[BASE_VOCAB:]).any(dim=1).all()


@pytest.mark.slow
def test_packed_evaluation_with_uneven_ranks_finishes_and_counts_every_sample(
    tiny_extended_dir,
    corpus,  # noqa: F811
    tmp_path,
) -> None:
    # one pack per evaluation batch: ranks holding different numbers of packs run different numbers of forwards
    packing = ["data.packing.enabled=true", "data.sequence.max_seq_len=192", "data.dev.dataloader.batch_size=1"]
    cfg = make_cfg("cpt", overrides("cpt", tiny_extended_dir, corpus, tmp_path / "x", *packing))
    dev = build_dataset(cfg.data, "dev", load_tokenizer(tiny_extended_dir))
    packs = [len(list(PackedDataset(dev.dataset, 192, 0, shuffle=False, rank=r, world_size=2))) for r in (0, 1)]
    assert packs[0] != packs[1], packs  # the case that desynchronised FSDP's collectives

    # lr 0: both runs evaluate the same weights, so the two-rank loss must equal the one-rank loss
    common = ["max_steps=2", "save_steps=2", "eval_steps=2", "gradient_accumulation_steps=1", "optimizer.lr=0"]
    common += packing
    run("cpt", overrides("cpt", tiny_extended_dir, corpus, tmp_path / "one", *common))
    args = overrides("cpt", tiny_extended_dir, corpus, tmp_path / "two", *common, "dist_timeout_s=120")
    done = subprocess.run(recipe_cmd("cpt", args, nproc=2), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "joined the gloo process group (timeout 120 s)" in done.stdout + done.stderr
    # each rank evaluates half of the dev documents; the rank that runs out first repeats zero-weight forwards
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert two[2]["dev_loss"] == pytest.approx(one[2]["dev_loss"], abs=1e-4)


# --- compile, devices, MFU -------------------------------------------------------------------------------


@pytest.mark.slow
def test_compiled_linear_loss_trains_like_the_eager_one(
    tiny_extended_dir,
    corpus,  # noqa: F811
    tmp_path,
) -> None:
    common = ["max_steps=2", "save_steps=1000", "gradient_accumulation_steps=1", "loss.type=linear"]
    run("cpt", overrides("cpt", tiny_extended_dir, corpus, tmp_path / "eager", *common))
    run("cpt", overrides("cpt", tiny_extended_dir, corpus, tmp_path / "compiled", *common, "compile=true"))
    eager, compiled = metrics(tmp_path / "eager"), metrics(tmp_path / "compiled")
    for step in (1, 2):
        assert compiled[step]["loss"] == pytest.approx(eager[step]["loss"], abs=1e-5)


@pytest.mark.parametrize(
    ("variable", "value"),
    [("CUDA_VISIBLE_DEVICES", "0"), ("SLURM_JOB_GPUS", "0,1"), ("SLURM_GPUS_ON_NODE", "4")],
)
def test_device_auto_refuses_the_cpu_in_a_gpu_allocation(
    tiny_extended_dir,
    corpus,  # noqa: F811
    tmp_path,
    monkeypatch,
    capsys,
    variable,
    value,
) -> None:
    for name in (*distributed.GPU_ID_VARS, *distributed.GPU_COUNT_VARS):
        monkeypatch.delenv(name, raising=False)
    assert distributed.resolve_device("auto") == torch.device("cpu")  # no GPU anywhere: the CPU is right
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValueError, match=f"{variable}={value} says this job has GPUs"):
        distributed.resolve_device("auto")
    args = overrides("cpt", tiny_extended_dir, corpus, tmp_path / "run", "device=auto", "max_steps=1")
    assert run_recipe(make_cfg("cpt", args), "cpt") == 2
    assert "make install GPU=1" in capsys.readouterr().err
    assert distributed.resolve_device("cpu") == torch.device("cpu")  # asking for the CPU stays possible


@pytest.mark.parametrize(
    ("variable", "value"), [("CUDA_VISIBLE_DEVICES", ""), ("CUDA_VISIBLE_DEVICES", "-1"), ("SLURM_GPUS_ON_NODE", "0")]
)
def test_variables_that_say_no_gpu_keep_auto_on_the_cpu(monkeypatch, variable, value) -> None:
    for name in (*distributed.GPU_ID_VARS, *distributed.GPU_COUNT_VARS):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(variable, value)
    assert distributed.resolve_device("auto") == torch.device("cpu")


def test_each_rank_drives_a_gpu_it_can_see() -> None:
    # torchrun on an 8-GPU node: local rank = GPU; srun binding one GPU per task: every task sees cuda:0
    assert [distributed.local_cuda_ordinal(rank, 8) for rank in range(8)] == list(range(8))
    assert [distributed.local_cuda_ordinal(rank, 1) for rank in range(4)] == [0, 0, 0, 0]
    assert distributed.local_cuda_ordinal(5, 4) == 1
    with pytest.raises(ValueError, match="no CUDA device"):
        distributed.local_cuda_ordinal(0, 0)


def test_flops_count_the_model_matrices_and_mfu_is_logged(
    tiny_extended_dir,
    corpus,  # noqa: F811
    tmp_path,
) -> None:
    recipe_args = overrides(
        "cpt", tiny_extended_dir, corpus, tmp_path / "run", "max_steps=2", "save_steps=2", "peak_tflops=0.5"
    )
    recipe, _, _ = run("cpt", recipe_args)
    arch = recipe.checkpointer.architecture
    model = build_model(arch, 64)
    counted = sum(p.numel() for name, p in model.named_parameters() if p.dim() == 2 and "tok_embeddings" not in name)
    counted += arch.vocab_size * arch.embed_dim if arch.tie_word_embeddings else 0  # the tied output projection
    n = flops.matmul_params(
        arch.num_layers, arch.embed_dim, arch.num_heads, arch.num_kv_heads, arch.intermediate_dim, arch.vocab_size
    )
    assert n == counted
    logged = metrics(tmp_path / "run")[2]
    assert logged["mfu"] == pytest.approx(logged["model_tflops_per_device"] / 0.5, rel=1e-3)
    assert flops.peak_flops(torch.device("cpu")) is None  # unknown device, no override: MFU is not guessed
