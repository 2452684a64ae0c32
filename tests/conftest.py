"""Shared fixtures: tiny Llama-3.2-shaped HF directories built locally (nothing is downloaded)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from ssi.testing import LlamaShape, write_llama_dir
from ssi.vocab.extend import extend_model_dir

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

N_TEST_DSUS = 300


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fp32, tied embeddings, the 2,000-rank tiktoken vocabulary (B = 2000, vocab 2256)."""
    return write_llama_dir(tmp_path_factory.mktemp("base") / "Llama-3.2-tiny", dtype=torch.float32)


@pytest.fixture(scope="session")
def tiny_extended_dir(tiny_base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("extended") / f"Llama-3.2-tiny-{N_TEST_DSUS}-dsus"
    return extend_model_dir(tiny_base_dir, out, N_TEST_DSUS, progress=False)


@pytest.fixture(scope="session")
def untied_base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bf16, untied output head, weights sharded over several files with an index."""
    return write_llama_dir(
        tmp_path_factory.mktemp("untied") / "Llama-untied",
        shape=LlamaShape(tie_word_embeddings=False),
        dtype=torch.bfloat16,
        shard_tensors=7,
    )


@pytest.fixture(scope="session")
def synthetic_corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic DSU corpus (train/validation/test parquet, 300 units at 50 Hz) in the published schema."""
    from ssi.data.synthetic import SyntheticSpec, make_synthetic_dataset

    spec = SyntheticSpec(n_train=64, n_validation=16, n_test=16, n_units=N_TEST_DSUS)
    return make_synthetic_dataset(tmp_path_factory.mktemp("synthetic") / "corpus", spec, progress=False)
