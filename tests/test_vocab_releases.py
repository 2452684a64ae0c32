"""Every published Llama 3 variant a user downloads extends: the 3.0, 3.1-3.3 and llama-models namings of the
special tokens, base and Instruct (chat template), tied and untied output weights, single-file and sharded
weights. For each, the manifest records the base's own table, both tokenizer paths give identical ids, and
transformers, torchtune and vLLM load the result."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ssi.model.builder import build_model
from ssi.model.checkpointer import SpeechCheckpointer
from ssi.testing import SPECIAL_NAMINGS, LlamaShape, special_tokens, write_llama_dir
from ssi.vocab.extend import extend_model_dir
from ssi.vocab.layout import MODALITY_SPEECH, MODALITY_TEXT, SpeechVocab, dsus_to_text
from ssi.vocab.tiktoken import load_base_tokenizer, load_tokenizer

from .test_vocab_tokenizers import PUNCT, WORDS

N_DSUS = 40
# name: (naming, instruct, shape, dtype, shard_tensors)
VARIANTS = {
    # Meta-Llama-3-8B-like: 3.0 names, untied head, 4 query heads per kv head, plain RoPE, bf16
    "llama-3.0-8b-like": (
        "3.0",
        False,
        LlamaShape(hidden_size=128, num_heads=4, num_kv_heads=1, tie_word_embeddings=False, rope_factor=None,
                   max_position_embeddings=8192),
        torch.bfloat16,
        None,
    ),
    # Llama-3.1-8B-Instruct / 3.3-70B-Instruct-like: untied, rope factor 8, sharded, chat template
    "llama-3.1-instruct-untied-sharded": (
        "3.1",
        True,
        LlamaShape(hidden_size=128, num_heads=4, num_kv_heads=1, tie_word_embeddings=False, rope_factor=8.0),
        torch.float32,
        5,
    ),
    # Llama 3.2 tables from llama-models (<|step_id|> at B+5), Instruct, tied
    "llama-models-3.2-instruct": ("llama-models", True, LlamaShape(), torch.float32, None),
}  # fmt: skip


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Path]:
    naming, instruct, shape, dtype, shards = VARIANTS[request.param]
    root = tmp_path_factory.mktemp(request.param)
    base = write_llama_dir(
        root / "base", shape=shape, dtype=dtype, shard_tensors=shards, naming=naming, instruct=instruct, std=0.3
    )
    return naming, base, extend_model_dir(base, root / "extended", N_DSUS, progress=False)


def test_manifest_records_the_base_table_and_looks_ids_up_by_name(variant) -> None:
    naming, base, extended = variant
    manifest = json.loads((extended / "ssi.json").read_text())
    assert manifest["special_tokens"] == special_tokens(2000, naming)
    has_eom = "<|eom_id|>" in manifest["special_tokens"]
    assert manifest["stop_tokens"] == ["<|end_of_text|>", "<|eot_id|>", *(["<|eom_id|>"] if has_eom else [])]
    assert manifest["pad_token"] == ("<|end_of_text|>" if naming == "3.0" else "<|finetune_right_pad_id|>")
    tokenizer = load_tokenizer(extended)
    assert tokenizer.stop_tokens == SpeechVocab.load(extended).stop_token_ids
    assert tokenizer.eot_id == 2009 and tokenizer.bos_id == 2000
    if naming == "llama-models":
        assert tokenizer.encode("<|step_id|>", add_bos=False, add_eos=False) == [2005]
    # the chat template and generation settings of an Instruct checkpoint are kept verbatim
    for name in ("generation_config.json",):
        assert json.loads((extended / name).read_text()) == json.loads((base / name).read_text())
    base_config = json.loads((base / "tokenizer_config.json").read_text())
    ext_config = json.loads((extended / "tokenizer_config.json").read_text())
    assert ext_config.get("chat_template") == base_config.get("chat_template")


def test_both_tokenizer_paths_agree_on_text_specials_and_units(variant) -> None:
    naming, base, extended = variant
    ours = load_tokenizer(extended)
    theirs = AutoTokenizer.from_pretrained(extended)
    names = list(special_tokens(2000, naming))
    rng = random.Random(5)
    for _ in range(200):
        parts = []
        for _ in range(rng.randint(1, 20)):
            kind = rng.random()
            if kind < 0.4:
                parts.append(rng.choice(WORDS + PUNCT))
            elif kind < 0.6:
                parts.append(rng.choice(names))
            elif kind < 0.85:
                parts.append(dsus_to_text(rng.randrange(N_DSUS) for _ in range(rng.randint(1, 6))))
            else:
                parts.append(rng.choice([MODALITY_TEXT, MODALITY_SPEECH]))
        text = "".join(parts)
        assert ours.encode(text, add_bos=False, add_eos=False) == theirs(text, add_special_tokens=False)["input_ids"]
    for name, token_id in special_tokens(2000, naming).items():
        assert ours.encode(name, add_bos=False, add_eos=False) == [token_id]
        assert theirs(name, add_special_tokens=False)["input_ids"] == [token_id]
    # text without units encodes as the base tokenizer does, through both paths
    base_ours, base_theirs = load_base_tokenizer(base), AutoTokenizer.from_pretrained(base)
    for text in ("Hello world, the cat", "naïve 1234567 don't <|eot_id|> x", " - ... !?"):
        expected = base_ours.encode(text, add_bos=False, add_eos=False)
        assert expected == base_theirs(text, add_special_tokens=False)["input_ids"]
        assert ours.encode(text, add_bos=False, add_eos=False) == expected


def test_transformers_and_torchtune_load_the_extension_with_unchanged_base_logits(variant) -> None:
    _, base, extended = variant
    ids = torch.randint(0, 2256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()(ids).logits
        after = AutoModelForCausalLM.from_pretrained(extended, dtype=torch.float32).eval()(ids).logits
    torch.testing.assert_close(after[..., :2256], before, atol=1e-5, rtol=1e-5)
    checkpointer = SpeechCheckpointer(extended, progress=False)
    with torch.device("cpu"):
        model = build_model(extended).float()
    model.load_state_dict({k: v.float() for k, v in checkpointer.load_checkpoint()["model"].items()})
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids), after, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_vllm_serves_every_variant_like_transformers(variant) -> None:
    vllm = pytest.importorskip("vllm", reason="vLLM is not installed")
    from ssi.model.engines import start_vllm, stop_vllm

    _, _, extended = variant
    tokenizer = load_tokenizer(extended)
    text = f"the cat {MODALITY_SPEECH}{dsus_to_text([3, 3, 17, 39])}{MODALITY_TEXT} sat"
    prompt = tokenizer.encode(text, add_bos=True, add_eos=False)
    llm = start_vllm(extended, max_model_len=128, dtype=torch.float32, gpu_memory_utilization=0.1)
    try:
        params = vllm.SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, detokenize=False)
        (output,) = llm.generate([vllm.inputs.TokensPrompt(prompt_token_ids=prompt)], params, use_tqdm=False)
    finally:
        stop_vllm(llm)
    model = AutoModelForCausalLM.from_pretrained(extended, dtype=torch.float32).eval()
    reference = model.generate(
        torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0
    )[0, len(prompt) :].tolist()
    assert list(output.outputs[0].token_ids) == reference


def test_namings_differ_where_the_releases_differ() -> None:
    tables = {naming: special_tokens(128000, naming) for naming in SPECIAL_NAMINGS}
    assert tables["3.0"]["<|reserved_special_token_4|>"] == 128008 and "<|eom_id|>" not in tables["3.0"]
    assert tables["3.1"]["<|eom_id|>"] == 128008 and tables["3.1"]["<|reserved_special_token_247|>"] == 128255
    assert tables["llama-models"]["<|step_id|>"] == 128005
    assert all(sorted(t.values()) == list(range(128000, 128256)) for t in tables.values())
