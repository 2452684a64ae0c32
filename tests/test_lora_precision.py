"""A LoRA run on a bf16 base is read back as what it trained (design.md: "What generation and transformers read
from a checkpoint computes what was trained (LoRA in bf16 included)").

A short, low-learning-rate run on the tiny bf16 model: its adapters change most weights by less than bf16 can
represent, so a merge saved in bf16 computes (nearly) the base model. The reference is PEFT on the extended base
with the run's adapter/, unmerged and in fp32 (tests/peft_reference.py, a process of its own).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from ssi.generate.pipeline import run_generation
from ssi.model.checkpointer import MODEL_KEY, MergedWeights, SpeechCheckpointer
from ssi.run_dir import GENERATIONS_FILE
from ssi.vocab.extend import extend_model_dir
from ssi.vocab.tiktoken import load_tokenizer

from .conftest import N_TEST_DSUS
from .test_train_recipe import make_cfg, overrides, run

REPO = Path(__file__).resolve().parents[1]
STEPS, LR, MAX_TOKENS = 10, "3e-5", 24


@pytest.fixture(scope="module")
def bf16_base(untied_base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return extend_model_dir(untied_base_dir, tmp_path_factory.mktemp("bf16") / "extended", N_TEST_DSUS, progress=False)


@pytest.fixture(scope="module")
def checkpoint(bf16_base: Path, synthetic_corpus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SFT with LoRA (rank 8 on every projection, the new rows trained), computing in bf16 as on a GPU."""
    out = tmp_path_factory.mktemp("lora-bf16") / "run"
    lora = ["trainable=lora", f"optimizer.lr={LR}", f"max_steps={STEPS}", f"save_steps={STEPS}", "eval_steps=1000"]
    args = overrides("sft", bf16_base, synthetic_corpus_dir, out, *lora, "dtype=bf16", "gradient_accumulation_steps=1")
    _, code, _ = run("sft", args)
    assert code == 0
    (found,) = (out / "checkpoints").glob(f"epoch_*/global_step_{STEPS}")
    return found


def generate(checkpoint: Path, out: Path, *extra: str) -> list[dict[str, Any]]:
    """The test split's greedy transcripts, as `scripts/generate.py model=<checkpoint> ...` writes them."""
    cfg = ["progress=false", f"model={checkpoint}", f"gen.output_dir={out}", "score=false"]
    run_generation(make_cfg("generate", [*cfg, f"sampling_params.max_tokens={MAX_TOKENS}", *extra]))
    return [json.loads(line) for line in (out / GENERATIONS_FILE).read_text().splitlines()]


def outputs(lines: list[dict[str, Any]]) -> list[list[int]]:
    return [line["output_token_ids"] for line in lines]


@pytest.fixture(scope="module")
def torch_lines(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return generate(checkpoint, tmp_path_factory.mktemp("gen") / "torch", "backend=torch")


@pytest.fixture(scope="module")
def prompts(torch_lines: list[dict[str, Any]]) -> list[list[int]]:
    return [line["prompt_token_ids"] for line in torch_lines]


@pytest.fixture(scope="module")
def peft_reader(
    bf16_base: Path, checkpoint: Path, prompts: list[list[int]], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[subprocess.Popen, Path]]:
    """PEFT's logits of the first prompt (base and trained model) and its greedy outputs for every prompt, being
    computed in a process of its own (one thread: the tiny model gains nothing from a second)."""
    folder = tmp_path_factory.mktemp("peft")
    stop = load_tokenizer(checkpoint).stop_tokens
    request = {"logits_of": prompts[0], "prompts": prompts, "max_tokens": MAX_TOKENS, "stop": stop}
    (folder / "request.json").write_text(json.dumps(request))
    reader = [sys.executable, str(REPO / "tests/peft_reference.py"), str(bf16_base), str(checkpoint)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([*reader, str(folder / "request.json"), str(folder / "answer.pt")], env=env)
    yield process, folder / "answer.pt"
    process.kill()


@pytest.fixture(scope="module")
def vllm_lines(checkpoint: Path, peft_reader: Any, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """vLLM's transcripts, started while PEFT computes its reference (two cores: both at once)."""
    return generate(checkpoint, tmp_path_factory.mktemp("gen") / "vllm", "backend=vllm")


@pytest.fixture(scope="module")
def peft(peft_reader: Any, vllm_lines: Any) -> dict[str, Any]:
    """The reference, once vLLM (which the reader runs beside) is done."""
    process, answer = peft_reader
    assert process.wait(timeout=600) == 0
    return torch.load(answer)


def distance(checkpoint: Path, tokens: list[int], peft: dict[str, Any], **load: Any) -> float:
    """How far transformers' logits of `checkpoint` are from the trained model's, as a share of the change that
    training made (1: no closer than the base model)."""
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(checkpoint, **load).eval()(torch.tensor([tokens])).logits[0]
    trained = peft["trained"]
    return float((logits.float() - trained).norm() / (trained - peft["base"]).norm())


@pytest.mark.slow
def test_transformers_reads_the_trained_logits_from_the_checkpoint(checkpoint, prompts, peft) -> None:
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["torch_dtype"] == "float32"  # the base's bf16 would round the adapters' deltas away
    for path in checkpoint.glob("*.safetensors"):
        assert {t.dtype for t in load_file(path).values()} == {torch.float32}, path
    found = distance(checkpoint, prompts[0], peft)  # as transformers reads it: config.json's dtype
    assert found <= 0.02, found
    rounded = distance(checkpoint, prompts[0], peft, dtype=torch.bfloat16)  # the merge as a bf16 file held it
    assert rounded > 0.1, rounded  # the run is one the bf16 merge loses


@pytest.mark.slow
def test_both_backends_generate_the_trained_models_transcripts(checkpoint, torch_lines, vllm_lines, peft, tmp_path):
    trained = peft["outputs"]
    assert outputs(torch_lines) == trained
    assert outputs(vllm_lines) == trained
    # the same weights rounded to bf16 (the merge as a bf16 checkpoint held it, read in its dtype) answer otherwise
    rounded = outputs(generate(checkpoint, tmp_path / "bf16", "backend=torch", "torch.dtype=bf16"))
    assert sum(a != b for a, b in zip(rounded, trained, strict=True)) >= 2


def test_the_merge_is_saved_in_fp32_unless_save_dtype_asks_otherwise(bf16_base, tmp_path, caplog) -> None:
    merged = MergedWeights(SpeechCheckpointer(bf16_base).load_checkpoint()[MODEL_KEY], torch.float32)
    written = {}
    for save_dtype in (None, "bf16"):
        checkpointer = SpeechCheckpointer(bf16_base, tmp_path / str(save_dtype), dtype=save_dtype, progress=False)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="ssi.model.checkpointer"):
            path = checkpointer.save_checkpoint({MODEL_KEY: merged}, 0, step=1)
        warned = any("the merged LoRA weights lose every delta below" in r.getMessage() for r in caplog.records)
        written[save_dtype] = (json.loads((path / "config.json").read_text())["torch_dtype"], warned)
    # the default keeps the merge's precision; an explicit bf16 is what the user asked for, said to lose the deltas
    assert written == {None: ("float32", False), "bf16": ("bfloat16", True)}
