"""scripts/encode_audio.py in process: MLS-schema shards the data pipeline reads, the manifest, sharded runs
equal to one run row for row, resume and refusal of a changed configuration, bad audio, the command line."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
import soundfile
import torch
from hydra import compose, initialize_config_dir

from ssi.data.sources import ColumnNames, DataValidationError, SourceSpec, load_source, validate_dataset
from ssi.encode import EncodeError
from ssi.encode.audio import AudioRef, decode_audio
from ssi.encode.encoders import EncoderPreset, LayerFeatures
from ssi.encode.fixtures import mixed_clips, synthetic_wave, write_audiofolder, write_tiny_hubert, write_tiny_mimi
from ssi.encode.output import MANIFEST_NAME, EncodedOutput
from ssi.encode.pipeline import encode_audio

REPO = Path(__file__).resolve().parents[1]
K = 32


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny HuBERT, centroids drawn from its layer-2 features, and an aligned audiofolder of 12 mixed clips."""
    root = tmp_path_factory.mktemp("encode")
    hubert = write_tiny_hubert(root / "hubert")
    preset = EncoderPreset.from_config({"name": "t", "n_units": K, "sampling_rate": 16000, "downsampling_ratio": 320,
                                        "backend": "ssl_kmeans", "model": str(hubert), "layer": 2})  # fmt: skip
    features = LayerFeatures(hubert, 2, preset, torch.device("cpu"), torch.float32)
    frames = torch.cat(features([synthetic_wave(2.0, 16000, 1, 6, seed=s)[:, 0] for s in range(2)])).numpy()
    np.save(root / "km.npy", frames[np.random.default_rng(0).choice(len(frames), K, replace=False)])
    audio = write_audiofolder(root / "audio", mixed_clips(12), alignments=True)
    return {"root": root, "hubert": hubert, "km": root / "km.npy", "audio": audio}


def hubert_args(assets: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        f"encoder.model={assets['hubert']}",
        f"encoder.kmeans={assets['km']}",
        f"encoder.n_units={K}",
        "encoder.layer=2",
        f"source={assets['audio']}",
        "split=train",
        f"output_dir={out}",
        *extra,
    ]


def encode(*overrides: str) -> dict:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("encode_audio", overrides=["device=cpu", "progress=false", "num_workers=2", *overrides])
    return encode_audio(cfg)


def rows_of(out: Path, split: str = "train") -> list[dict]:
    return datasets.load_dataset(str(out), split=split).to_list()


def test_encoded_folder_is_a_data_source_in_the_mls_schema(assets: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    manifest = encode(*hubert_args(assets, out))
    assert json.loads((out / MANIFEST_NAME).read_text()) == manifest
    encoder = manifest["encoder"]
    assert (encoder["name"], encoder["n_units"], encoder["frame_rate"], encoder["layer"]) == (
        "hubert_large_ll60k_layer22",
        K,
        50.0,
        2,
    )
    assert len(encoder["model_sha256"]) == len(encoder["kmeans_sha256"]) == 64 and encoder["dtype"] == "float32"
    assert encoder["feature_extractor"] == {"do_normalize": True, "return_attention_mask": True}
    split = manifest["splits"]["train"]
    assert split["complete"] and split["rows"] == 12 and split["files"] == ["data/train-00000-of-00001.parquet"]
    durations = [decode_audio(AudioRef(str(p)), 16000).size for p in sorted(assets["audio"].glob("utt*"))]
    assert split["audio_hours"] == pytest.approx(sum(durations) / 16000 / 3600, abs=1e-6)
    assert {"torch", "transformers", "datasets", "soundfile", "soxr"} <= set(manifest["versions"])

    ds = load_source(SourceSpec(str(out), split="train"), ColumnNames())  # the default MLS column names
    assert ds.column_names == ColumnNames().all()
    checked, report = validate_dataset(ds, ColumnNames(), n_dsus=K, fps=50.0)
    assert report.n_kept == 12
    assert [len(u) for u in checked["speech_tokens"]] == [(n - 400) // 320 + 1 for n in durations]
    assert checked["ID"] == [f"utt{i:04d}" for i in range(12)]
    metadata = [json.loads(line) for line in (assets["audio"] / "metadata.jsonl").read_text().splitlines()]
    assert checked["transcript"] == [m["transcript"] for m in metadata]
    assert checked["aligned_token_end_time"] == [m["aligned_token_end_time"] for m in metadata]


def test_shards_together_equal_one_run_row_for_row(assets: dict[str, Path], tmp_path: Path) -> None:
    single = tmp_path / "single"
    encode(*hubert_args(assets, single))
    sharded = tmp_path / "sharded"
    small_batches = ["batch.seconds=2", "batch.max_rows=3", "chunk_rows=2"]  # other batches: same units
    encode(*hubert_args(assets, sharded, "shard=2", "num_shards=3", *small_batches))
    encode(*hubert_args(assets, sharded, "shard=0", "num_shards=3", *small_batches))
    with pytest.raises(DataValidationError, match=r"split 'train' has 2 of 3 shards \(missing \[1\]\); finish"):
        load_source(SourceSpec(str(sharded), split="train"), ColumnNames())
    partial = json.loads((sharded / MANIFEST_NAME).read_text())["splits"]["train"]
    assert (partial["shards_done"], partial["complete"]) == (2, False)
    manifest = encode(*hubert_args(assets, sharded, "shard=1", "num_shards=3", *small_batches))
    assert manifest["splits"]["train"]["complete"] and manifest["splits"]["train"]["rows"] == 12
    assert rows_of(sharded) == rows_of(single)


def test_rerun_skips_done_shards_and_refuses_a_changed_configuration(assets: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    encode(*hubert_args(assets, out))
    shard = out / "data" / "train-00000-of-00001.parquet"
    before = shard.stat().st_mtime_ns
    encode(*hubert_args(assets, out))
    assert shard.stat().st_mtime_ns == before
    refusals = [
        (["encoder.layer=3"], r"encoder.layer: 2 \(there\) != 3 \(now\)"),
        (["dtype=bf16"], r"encoder.dtype: 'float32' \(there\) != 'bfloat16' \(now\)"),
        (["columns.id=file_name"], r"columns: .*'id': None.* \(there\) != .*'id': 'file_name'"),
        (["shard=0", "num_shards=2"], r"num_shards: 1 \(there\) != 2 \(now\)"),
    ]
    for extra, message in refusals:
        with pytest.raises(
            EncodeError, match=f"holds train-00000-of-00001.parquet, encoded with another configuration: {message}"
        ):
            encode(*hubert_args(assets, out, *extra))
    encode(*hubert_args(assets, out, "split=test"))  # another split into the same folder
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert sorted(manifest["splits"]) == ["test", "train"]
    test_ids = list(load_source(SourceSpec(str(out), split="test"), ColumnNames())["ID"])
    assert test_ids == [r["ID"] for r in rows_of(out)]
    assert shard.stat().st_mtime_ns == before


def test_bad_audio_fails_naming_the_row_and_writes_nothing_or_is_skipped(
    assets: dict[str, Path], tmp_path: Path
) -> None:
    folder = write_audiofolder(tmp_path / "audio", mixed_clips(5))
    (folder / "utt0001.flac").write_bytes(b"broken")
    soundfile.write(folder / "utt0003.ogg", np.zeros((0, 1), dtype=np.float32), 8000, format="WAV")
    soundfile.write(folder / "utt0004.wav", np.zeros(200, dtype=np.float32), 16000)
    out = tmp_path / "out"
    args = [a for a in hubert_args(assets, out) if not a.startswith("source=")] + [f"source={folder}"]
    with pytest.raises(
        EncodeError, match=r"audio\[train\]: row 1 \(id 'utt0001'\): cannot decode file '.*utt0001.flac'"
    ):
        encode(*args)
    assert not (out / "data").exists() or not list((out / "data").iterdir())
    assert not list((out / ".partial").iterdir())
    manifest = encode(*args, "on_bad_audio=skip")
    split = manifest["splits"]["train"]
    assert split["rows"] == 2 and split["skipped"] == 3
    reasons = {row["id"]: row["reason"] for row in split["skipped_rows"]}
    assert "cannot decode" in reasons["utt0001"] and "is empty (0 samples)" in reasons["utt0003"]
    assert "is too short: 200 samples at 16000 Hz, the encoder needs at least 400" in reasons["utt0004"]
    assert [r["ID"] for r in rows_of(out)] == ["utt0000", "utt0002"]


def test_mimi_units_at_12_5_hz(tmp_path: Path, assets: dict[str, Path]) -> None:
    mimi = write_tiny_mimi(tmp_path / "mimi")
    out = tmp_path / "out"
    manifest = encode("encoder=mimi_srvq0", f"encoder.model={mimi}", "encoder.n_units=256", f"source={assets['audio']}",
                      "split=train", f"output_dir={out}", "batch.max_rows=4")  # fmt: skip
    assert manifest["encoder"]["frame_rate"] == 12.5 and manifest["encoder"]["codebook"] == 0
    durations = [decode_audio(AudioRef(str(p)), 24000).size for p in sorted(assets["audio"].glob("utt*"))]
    ds = load_source(SourceSpec(str(out), split="train"), ColumnNames())
    checked, _ = validate_dataset(ds, ColumnNames(), n_dsus=256, fps=12.5)
    assert [len(u) for u in checked["speech_tokens"]] == [-(-n // 1920) for n in durations]


def test_output_errors(assets: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(EncodeError, match="exists and is not a folder"):
        encode(*hubert_args(assets, tmp_path / "file"))
    with pytest.raises(EncodeError, match="split 'a/b': use letters, digits"):
        encode(*hubert_args(assets, tmp_path / "out", "split=a/b"))


def test_command_line_reports_bad_input_in_one_line(tmp_path: Path) -> None:
    script = str(REPO / "scripts" / "encode_audio.py")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cases = [
        (
            ["encoder=speechtokenizer_rvq0", "source=x", f"output_dir={tmp_path}"],
            "error: encoder 'speechtokenizer_rvq0' cannot be encoded here: the speechtokenizer package",
        ),
        ([f"output_dir={tmp_path}"], "error: missing required setting source: pass source=... on the command line"),
    ]
    for args, message in cases:
        done = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, cwd=tmp_path, env=env)
        assert done.returncode == 2, done.stderr[-2000:]
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(message), done.stderr[-2000:]


def test_hub_ids_resolve_through_the_cache_and_record_the_commit(
    assets: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hub model id is fetched into huggingface_hub's cache (here pre-filled: no network) and its commit is
    recorded; the same weights from a local directory encode the same units, so resuming is allowed."""
    import datasets.config
    import huggingface_hub.constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tiny-hubert"
    shutil.copytree(assets["hubert"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    out = tmp_path / "out"
    local = encode(*hubert_args(assets, out))["encoder"]
    hub_args = [a for a in hubert_args(assets, out, "split=test") if not a.startswith("encoder.model=")]
    hub = encode(*hub_args, "encoder.model=someone/tiny-hubert")["encoder"]
    assert (hub["model"], hub["model_revision"], local["model_revision"]) == ("someone/tiny-hubert", commit, None)
    assert hub["model_sha256"] == local["model_sha256"]
    with pytest.raises(
        EncodeError,
        match=r"encoder.model=someone/absent: there is no local file or folder someone/absent .*as a hub id",
    ):
        encode(*hub_args, "encoder.model=someone/absent")
    with pytest.raises(EncodeError, match=r"source=nobody/nothing: there is no local .* \(config 'en', split 'test'\)"):
        encode(*hubert_args(assets, tmp_path / "other"), "source=nobody/nothing", "source_config=en", "split=test")


def _writer_process(out: Path, shard: int, ready: Path) -> subprocess.Popen:
    """A process that opens a shard writer in `out` (as an encoding task does) and then waits inside it."""
    script = f"""
import time
from pathlib import Path
import pyarrow as pa
from ssi.encode.output import EncodedOutput, output_schema
out = EncodedOutput(Path({str(out)!r}))
with out.write_shard(out.shard_path("train", {shard}, 2), output_schema(False)) as writer:
    writer.write({{"ID": ["a"], "transcript": ["x"], "speech_tokens": [[1, 2]]}})
    Path({str(ready)!r}).touch()
    time.sleep(300)
"""
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the writer never reached its shard"
        time.sleep(0.05)
    return proc


def test_partial_files_of_killed_writers_are_removed_and_live_ones_kept(assets: dict[str, Path], tmp_path: Path):
    """A writer holds a lock on its partial file while it lives: a run removes the partial files nobody holds
    (writers killed with SIGKILL) and keeps those of writers still running, as N Slurm tasks sharing the
    folder need."""
    out = tmp_path / "out"
    killed = _writer_process(out, 0, tmp_path / "ready0")
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    live = _writer_process(out, 0, tmp_path / "ready1")
    try:
        partial = out / ".partial"
        assert len(list(partial.iterdir())) == 2  # the killed writer's file stayed behind
        encode(*hubert_args(assets, out, "num_shards=2", "shard=1"))
        left = [p.name for p in partial.iterdir()]
        assert left == [f"train-00000-of-00002.parquet.tmp-{socket.gethostname()}-{live.pid}"], left
        assert EncodedOutput(out).remove_dead_partials() == []  # the live writer's file is not touched
    finally:
        live.kill()
        live.wait()
    assert [p.name for p in EncodedOutput(out).remove_dead_partials()] == left
    assert (out / "data" / "train-00001-of-00002.parquet").is_file()
