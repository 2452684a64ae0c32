"""A new user's own corpus, from wav files to a report, with the README's commands only (docs/encoding.md,
"Your own corpus"): a folder with train and test splits and no validation, a tiny random encoder and model
built by the documented commands, k-means, encoding, SFT with a dev split held out of train, generation with
`model=<run dir>`, every checkpoint through evaluate_run, and the report. Then each first-minute mistake of
issue 21 gets its one-line answer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ssi.encode.fixtures import mixed_clips, write_audiofolder

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
K = 32


def command(path: str, *args: str, cwd: Path, code: int = 0) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, str(REPO / path), *args], capture_output=True, text=True, cwd=cwd, env=ENV)
    assert done.returncode == code, (path, args, done.stdout[-2000:], done.stderr[-3000:])
    return done


@pytest.fixture(scope="module")
def own_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A working folder laid out as docs/encoding.md tells a user: data/my_corpus/{train,test}/metadata.csv."""
    root = tmp_path_factory.mktemp("own")
    write_audiofolder(root / "data/my_corpus/train", mixed_clips(30, prefix="tr"), metadata="csv")
    write_audiofolder(root / "data/my_corpus/test", mixed_clips(6, prefix="te", seed=1), metadata="csv")
    return root


@pytest.fixture(scope="module")
def encoded(own_corpus: Path) -> Path:
    """The documented steps up to an encoded folder and a model extended for it (docs/encoding.md)."""
    cwd = own_corpus
    command("scripts/make_tiny_llama.py", "--output_dir", "models/tiny-llama", cwd=cwd)
    command(
        "scripts/extend_llama3_2.py",
        "--n_new_dsus",
        str(K),
        "--input_dir",
        "models/tiny-llama",
        "--output_dir",
        "models/tiny-llama-32",
        cwd=cwd,
    )
    command("scripts/make_tiny_encoder.py", "--output", "models/tiny-hubert", cwd=cwd)
    encoder = ["encoder=hubert_large_ll60k_layer22", "encoder.model=models/tiny-hubert", "encoder.layer=2"]
    km = "models/kmeans/my_corpus_k32.safetensors"
    fit = command(
        "scripts/train_kmeans.py",
        *encoder,
        "source=data/my_corpus",
        "split=train",
        f"k={K}",
        "kmeans.n_init=2",
        f"output={km}",
        "device=cpu",
        cwd=cwd,
    )
    assert "k-means++ inits" in fit.stderr and "k-means steps" in fit.stderr  # the fit shows its progress
    for split in ("train", "test"):
        command(
            "scripts/encode_audio.py",
            *encoder,
            f"encoder.n_units={K}",
            f"encoder.kmeans={km}",
            "source=data/my_corpus",
            f"split={split}",
            "output_dir=data/encoded/my_corpus",
            "device=cpu",
            "progress=false",
            cwd=cwd,
        )
    return cwd


def test_own_corpus_from_wav_files_to_a_report(encoded: Path) -> None:
    cwd = encoded
    data = ["data=sft/encoded", "data.train.dataset.source=data/encoded/my_corpus", "data.dev.from_train=0.2"]
    shown = command("scripts/inspect_data.py", "model=models/tiny-llama-32", *data, "split=dev", "n_stats=4",
                    cwd=cwd).stdout  # fmt: skip
    assert f"{K} units at 50 Hz" in shown and "split=train_heldout_0.2" in shown and "sft: chat examples" in shown
    assert "sequence: type=" not in shown  # SFT presets build chat examples, not CPT sequence types
    command(
        "recipes/sft.py",
        *data,
        "model=models/tiny-llama-32",
        "output_dir=runs/my-sft",
        "size=tiny",
        "max_steps=6",
        "save_steps=3",
        "eval_steps=3",
        "optimizer.lr=2e-3",
        "data.train.dataloader.batch_size=4",
        "progress=false",
        cwd=cwd,
    )
    run = cwd / "runs/my-sft"
    generated = command("scripts/generate.py", "model=runs/my-sft", "backend=torch", "sampling_params.max_tokens=4",
                        "progress=false", cwd=cwd).stdout  # fmt: skip
    assert "model=runs/my-sft is a run directory: using its final checkpoint runs/my-sft/checkpoints/" in generated
    test_wer = json.loads((run / "generations/epoch_0/global_step_6/my_corpus/test/wer.json").read_text())
    assert test_wer["n_utterances"] == 6 and test_wer["split"] == "test"
    out = command("scripts/evaluate_run.py", "run=runs/my-sft", "test_sets=[dev,test]", "generate.backend=torch",
                  "generate.sampling_params.max_tokens=4", "generate.progress=false", cwd=cwd).stdout  # fmt: skip
    assert "2 checkpoints, 4 tasks, 1 already there, 3 to run" in out
    assert "evaluate_run: 3 done, 0 failed, 1 already there (3 tasks run, 4 in all)" in out
    held = json.loads((run / "generations/epoch_0/global_step_3/my_corpus/train_heldout_0.2/wer.json").read_text())
    assert held["n_utterances"] == 6  # 20% of the 30 train utterances
    report = command("scripts/report.py", "runs/my-sft", "--output", "reports/my-sft", cwd=cwd)
    text = (cwd / "reports/my-sft/report.md").read_text()
    assert "wer/my_corpus/train_heldout_0.2" in text and "report of 1 runs" in report.stdout


def one_line(code: int, capsys) -> str:
    """What a command body printed on stderr for bad input: exit code 2 and one `error:` line, no traceback."""
    err = capsys.readouterr().err
    assert code == 2 and err.count("error: ") == 1 and "Traceback" not in err, (code, err[-3000:])
    return err


def test_first_minute_mistakes_get_one_line_answers(encoded: Path, monkeypatch, capsys) -> None:
    """The bodies of the README's commands (what each script's main runs), in this process and from the user's
    folder; test_overrides.py and the e2e test above run the scripts themselves."""
    from ssi.encode.kmeans_training import train_kmeans
    from ssi.encode.pipeline import encode_audio
    from ssi.encode.settings import run_cli
    from ssi.eval.scoring import main as wer
    from ssi.generate.pipeline import main as generate
    from ssi.train.recipe import run_recipe

    from .test_train_recipe import make_cfg

    monkeypatch.chdir(encoded)
    folder = "data.train.dataset.source=data/encoded/my_corpus"

    def sft(*args: str, model: str = "models/tiny-llama-32") -> int:
        train = [f"model={model}", "size=tiny", "max_steps=1", "progress=false"]
        return run_recipe(make_cfg("sft", ["data=sft/encoded", *train, *args]), "sft")

    # a corpus without a validation split: the missing split and the ways out
    err = one_line(sft(folder, "output_dir=runs/failed"), capsys)
    assert (
        "no split 'validation'" in err and "data.dev.from_train=<fraction or count>" in err and "data.dev=null" in err
    )
    # generating a dev split that a run without one does not have
    assert sft(folder, "data.dev=null", "save_steps=1", "output_dir=runs/no-dev") == 0
    capsys.readouterr()
    err = one_line(generate(make_cfg("generate", ["model=runs/no-dev", "gen.split=dev", "backend=torch"])), capsys)
    assert "gen.split=dev: the preset has no dev section; its splits are train" in err
    # encoding a folder of wav files without metadata
    (encoded / "data/loose/train").mkdir(parents=True)
    for wav in (encoded / "data/my_corpus/train").glob("*.wav"):
        (encoded / "data/loose/train" / wav.name).write_bytes(wav.read_bytes())
    km = "encoder.kmeans=models/kmeans/my_corpus_k32.safetensors"
    encoder = ["encoder=hubert_large_ll60k_layer22", "encoder.model=models/tiny-hubert", "encoder.layer=2",
               f"encoder.n_units={K}", km, "device=cpu"]  # fmt: skip

    def encode(*args: str) -> int:
        return run_cli(encode_audio, make_cfg("encode_audio", [*encoder, "split=train", *args]))

    err = one_line(encode("source=data/loose", "output_dir=data/encoded/loose"), capsys)
    assert "data/loose/train/metadata.csv|jsonl" in err and "found: train/ (" in err and ".wav" in err
    # a mistyped local folder is not looked up on the hub
    err = one_line(encode("source=data/my_corpu", "output_dir=data/encoded/x"), capsys)
    assert "source=data/my_corpu: no such local file or folder" in err and "did you mean data/my_corpus?" in err
    err = one_line(sft(folder[:-1], "output_dir=runs/typo"), capsys)
    assert "no such local file or folder" in err and "did you mean data/encoded/my_corpus?" in err

    def kmeans(*args: str) -> int:
        return run_cli(train_kmeans, make_cfg("train_kmeans", ["source=data/my_corpus", "k=4", *args]))

    err = one_line(kmeans("encoder.model=models/tiny-hubrt", "output=models/x.safetensors"), capsys)
    assert "encoder.model=models/tiny-hubrt: no such local file or folder" in err
    assert "did you mean models/tiny-hubert" in err
    # no encoder without the hub: the way to use a downloaded one, and the dry-run encoder
    err = one_line(kmeans("output=x.safetensors"), capsys)
    assert "encoder.model=facebook/hubert-large-ll60k" in err and "encoder.model=<its local directory>" in err
    assert "huggingface-cli download" in err and "scripts/make_tiny_encoder.py" in err
    # the folder's encoding.json is the truth: a model with fewer unit rows than the folder's units is refused
    command("scripts/extend_llama3_2.py", "--n_new_dsus", "16", "--input_dir", "models/tiny-llama",
            "--output_dir", "models/tiny-llama-16", cwd=encoded)  # fmt: skip
    err = one_line(sft(folder, "data.dev.from_train=0.2", "output_dir=runs/16", model="models/tiny-llama-16"), capsys)
    assert f"has {K} units but the model manifest has n_dsus=16" in err
    # wer.py names a missing input before anything else
    (encoded / "gen").mkdir()
    (encoded / "gen/wer.json").write_text("{}")
    err = one_line(wer(["gen/generations.jsonl"]), capsys)
    assert "gen/generations.jsonl is not a file" in err
