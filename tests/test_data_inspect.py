"""The inspection report shows formatted examples, SFT masking and statistics for a composed preset."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ssi.data.stats import TokenRenderer, inspection_report
from ssi.vocab.tiktoken import SpeechLlama3Tokenizer, load_tokenizer

CONF = Path(__file__).resolve().parents[1] / "conf"


@pytest.fixture(scope="module")
def tok(tiny_extended_dir: Path) -> SpeechLlama3Tokenizer:
    return load_tokenizer(tiny_extended_dir)


def report(tok, corpus: Path, *overrides: str) -> str:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("inspect_data", overrides=["model=unused", f"data.train.dataset.source={corpus}", *overrides])
    return inspection_report(OmegaConf.to_container(cfg, resolve=True), tok)


def test_renderer_shows_dsus_specials_and_text(tok) -> None:
    renderer = TokenRenderer(tok)
    tokens = [2000, 2557, 2256 + 12, 2256 + 12, 2256 + 7, 2556, 407, 282, 287, 2001]
    assert (
        renderer.render(tokens)
        == "<|begin_of_text|><extra_id_MM_SPEECH><12><12><7><extra_id_MM_TEXT>the cat<|end_of_text|>"
    )
    assert renderer.counts(tokens) == {"text": 3, "dsu": 3, "special": 4}


def test_cpt_report(tok, synthetic_corpus_dir: Path) -> None:
    text = report(
        tok, synthetic_corpus_dir, "data=cpt/synthetic", "n_examples=2", "n_stats=20", "data.sequence.dedup=true"
    )
    assert "encoder: synthetic, 300 units at 50 Hz (16000 / 320)" in text
    assert "64/64 samples kept" in text
    assert text.count("=== example") == 2 and "synth_train_000000 (interleaved)" in text
    assert "<|begin_of_text|>" in text and "<extra_id_MM_SPEECH><" in text
    assert "statistics over the first 20 of 64 samples" in text
    for line in ("length percentiles p5/p25/p50/p75/p95:", "token shares: text", "truncated: 0 (0.0%)", "dedup ratio:"):
        assert line in text


def test_sft_report_shows_masking_and_truncation(tok, synthetic_corpus_dir: Path) -> None:
    text = report(
        tok, synthetic_corpus_dir, "data=sft/synthetic", "n_examples=1", "n_stats=8", "data.sequence.max_seq_len=40"
    )
    assert "(truncated)" in text and "truncated: 8 (100.0%)" in text
    text = report(tok, synthetic_corpus_dir, "data=sft/synthetic", "n_examples=1", "n_stats=8")
    assert "--- trained on (" in text and "the rest have label -100" in text
    assert "<|start_header_id|>assistant<|end_header_id|>" in text and "trained label positions:" in text
    prompts = report(tok, synthetic_corpus_dir, "data=sft/synthetic", "split=test", "inference=true", "n_stats=4")
    assert "--- reference: " in prompts and "synth_test_000000" in prompts


def test_inspect_script_runs_through_hydra(tiny_extended_dir: Path, synthetic_corpus_dir: Path, tmp_path: Path) -> None:
    script = CONF.parent / "scripts" / "inspect_data.py"
    cmd = [sys.executable, str(script), f"model={tiny_extended_dir}", "data=sft/synthetic"]
    cmd += [f"data.train.dataset.source={synthetic_corpus_dir}", "n_examples=1", "n_stats=4"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "=== example 0: synth_train_000000" in done.stdout and "statistics over the first 4 of 64" in done.stdout
    assert list(tmp_path.iterdir()) == []  # an inspection writes nothing
