"""Audio in, transcripts out: train_kmeans.py -> encode_audio.py -> inspect_data.py -> SFT -> generate.py
(torch backend) for HuBERT + k-means and for Mimi, through the ASR test-set presets; and the Slurm array
snippet, whose shards equal a single-process run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import pytest

from ssi.encode.fixtures import mixed_clips, write_audiofolder, write_tiny_hubert, write_tiny_mimi
from ssi.encode.kmeans import load_centroids
from ssi.encode.pipeline import encode_audio
from ssi.generate.pipeline import run_generation

from .slurm_cluster import needs_slurm
from .test_train_recipe import make_cfg, run

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
K = 48


@pytest.fixture(scope="module")
def audio(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_audiofolder(tmp_path_factory.mktemp("e2e") / "audio", mixed_clips(24, seed=3))


def script(name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / name), *args], capture_output=True, text=True, cwd=cwd, env=ENV
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def sft(model: Path, data: list[str], out: Path) -> Path:
    """Three SFT steps on the encoded folder; returns the checkpoint."""
    args = ["size=tiny", "data=sft/synthetic", f"model={model}", f"output_dir={out}", "progress=false",
            "data.train.dataloader.batch_size=4", "max_steps=3", "save_steps=3", "eval_steps=3", *data]  # fmt: skip
    _, code, _ = run("sft", args)
    assert code == 0
    (checkpoint,) = (out / "checkpoints").glob("epoch_*/global_step_3")
    return checkpoint


def generate(checkpoint: Path, preset: str, encoded: Path, n_units: int, out: Path) -> list[dict]:
    record = run_generation(
        make_cfg(
            "generate",
            [
                f"model={checkpoint}",
                "backend=torch",
                f"data=sft/{preset}",
                f"data.test.dataset.source={encoded}",
                f"data.encoder.n_units={n_units}",
                f"gen.output_dir={out}",
                "sampling_params.max_tokens=4",
                "progress=false",
            ],
        )
    )
    assert record["backend"] == "torch"
    assert (out / "wer.json").is_file()
    return [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]


def test_hubert_kmeans_from_audio_to_transcripts(tiny_extended_dir: Path, audio: Path, tmp_path: Path) -> None:
    hubert = write_tiny_hubert(tmp_path / "hubert")
    km = tmp_path / "km" / "tiny_l2_k48.safetensors"
    done = script("train_kmeans.py", f"encoder.model={hubert}", "encoder.layer=2", f"k={K}", f"source={audio}",
                  "split=train", "sample.hours=null", "kmeans.n_init=2", f"output={km}", "device=cpu", "progress=false",
                  cwd=tmp_path)  # fmt: skip
    centroids = load_centroids(km)
    assert (centroids.k, centroids.dim, centroids.metadata["layer"]) == (K, 32, "2")
    assert (
        f"encoder=hubert_large_ll60k_layer22 encoder.model={hubert} encoder.layer=2 encoder.n_units={K} " in done.stdout
    )
    assert f"encoder.kmeans={km}" in done.stdout and "data=sft/encoded" in done.stdout

    out = tmp_path / "encoded"
    encode = [f"encoder.model={hubert}", "encoder.layer=2", f"encoder.n_units={K}", f"encoder.kmeans={km}",
              f"source={audio}", f"output_dir={out}", "device=cpu", "progress=false"]  # fmt: skip
    script("encode_audio.py", *encode, "split=train", cwd=tmp_path)
    encode_audio(make_cfg("encode_audio", [*encode, "split=test"]))
    units = np.concatenate([r["speech_tokens"] for r in datasets.load_dataset(str(out), split="train")])
    assert units.max() < K and len(np.unique(units)) > K // 4  # the trained k-means spreads the frames

    data = [f"data.train.dataset.source={out}", "data.dev.dataset.split=test", f"data.encoder.n_units={K}"]
    shown = script("inspect_data.py", f"model={tiny_extended_dir}", *data, "data=sft/synthetic", "n_examples=1",
                   "n_stats=8", cwd=tmp_path).stdout  # fmt: skip
    assert f"{K} units at 50 Hz (16000 / 320)" in shown and "24/24 samples kept" in shown and "utt0000" in shown

    checkpoint = sft(tiny_extended_dir, data, tmp_path / "run")
    lines = generate(checkpoint, "librispeech_test_clean_hubert_large_l22", out, K, tmp_path / "gen")
    assert sorted(line["id"] for line in lines) == [f"utt{i:04d}" for i in range(24)]


def test_mimi_from_audio_to_transcripts(tiny_extended_dir: Path, audio: Path, tmp_path: Path) -> None:
    mimi = write_tiny_mimi(tmp_path / "mimi")
    out = tmp_path / "encoded"
    for split in ("train", "test"):
        args = ["encoder=mimi_srvq0", f"encoder.model={mimi}", "encoder.n_units=256", f"source={audio}"]
        encode_audio(
            make_cfg("encode_audio", [*args, f"split={split}", f"output_dir={out}", "device=cpu", "progress=false"])
        )
    data = [f"data.train.dataset.source={out}", "data.dev.dataset.split=test", "data.encoder.n_units=256",
            "data.encoder.sampling_rate=24000", "data.encoder.downsampling_ratio=1920"]  # fmt: skip
    checkpoint = sft(tiny_extended_dir, data, tmp_path / "run")
    lines = generate(checkpoint, "librispeech_test_clean_mimi_srvq0", out, 256, tmp_path / "gen")
    assert len(lines) == 24 and all(line["n_prompt_tokens"] > 0 for line in lines)


@pytest.mark.slurm
@needs_slurm
def test_slurm_array_shards_equal_a_single_run(audio: Path, tmp_path: Path) -> None:
    hubert = write_tiny_hubert(tmp_path / "hubert")
    np.save(tmp_path / "km.npy", np.random.default_rng(0).standard_normal((K, 32)).astype(np.float32))
    encode = [f"encoder.model={hubert}", "encoder.layer=2", f"encoder.n_units={K}", f"encoder.kmeans={tmp_path}/km.npy",
              f"source={audio}", "split=train", "device=cpu"]  # fmt: skip
    sharded = tmp_path / "sharded"
    submit = subprocess.run(
        ["sbatch", "--parsable", "--array=0-2", "--gpus-per-node=0", "--cpus-per-task=1",
         f"--output={tmp_path}/slurm-%A_%a.out", str(REPO / "snippets/encode_audio.sbatch"),
         *encode, f"output_dir={sharded}"],
        cwd=REPO, env={**ENV, "SSI_PYTHON": sys.executable}, capture_output=True, text=True, check=True,
    )  # fmt: skip
    job = submit.stdout.strip().split(";")[0]
    try:
        single = tmp_path / "single"
        encode_audio(make_cfg("encode_audio", [*encode, f"output_dir={single}", "progress=false"]))
        deadline = time.monotonic() + 240
        while subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout.strip():
            assert time.monotonic() < deadline, "the array job did not finish in time"
            time.sleep(2)
    finally:
        subprocess.run(["scancel", job], capture_output=True)
    logs = "\n".join(p.read_text() for p in tmp_path.glob("slurm-*.out"))
    manifest = json.loads((sharded / "encoding.json").read_text())
    assert manifest["splits"]["train"]["complete"] and manifest["splits"]["train"]["num_shards"] == 3, logs
    assert sorted(p.name for p in (sharded / "data").iterdir()) == [f"train-0000{i}-of-00003.parquet" for i in range(3)]
    assert "SLURM_ARRAY_TASK_ID=1" in logs
    assert (
        datasets.load_dataset(str(sharded), split="train").to_list()
        == datasets.load_dataset(str(single), split="train").to_list()
    )
