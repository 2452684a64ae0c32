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
# vLLM's CPU engine: a 1 GiB KV cache (plenty for the tiny models), which also skips its warm-up pass; by default
# it takes 30% of host memory, too much for two test workers at once (make test runs pytest -n 2).
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
if "PYTEST_XDIST_WORKER" in os.environ:
    # Two workers on two cores: one thread each (and in every process they start) instead of two threads
    # fighting over each core; the tiny test models gain little from a second thread anyway.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under pytest-xdist (`--dist loadgroup`), a module's tests stay on one worker, so its module-scoped
    fixtures (trained runs, vLLM engines) are built once; the tests that submit jobs to the one-node Slurm
    cluster form one group, so they never queue behind each other's jobs."""
    for item in items:
        group = "slurm" if item.get_closest_marker("slurm") else item.module.__name__
        item.add_marker(pytest.mark.xdist_group(group))


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
