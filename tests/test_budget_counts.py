"""What a run trained on, counted three ways (issue 28): text tokens, speech positions (unit tokens for units,
audio slots for features) and seconds of audio, per step and in total, summed over ranks and continued on
resume; the `max_audio_hours` budget; and the report's columns. One spoken corpus is trained as units (encoded
by a tiny HuBERT + k-means at 50 Hz) and as features (the same tiny HuBERT through a projector), so that both
runs read the same utterances and their counts can be checked against the corpus itself."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import datasets
import numpy as np
import pytest
import soundfile
import torch

from ssi import run_dir
from ssi.encode.fixtures import write_spoken_corpus, write_tiny_hubert
from ssi.encode.pipeline import encode_audio
from ssi.report.cli import main as report_main
from ssi.run_dir import read_metrics as metrics
from ssi.train.budget import Budget, BudgetError
from ssi.train.recipe import RecipeError, SpeechTrainingRecipe
from ssi.vocab.tiktoken import load_tokenizer

from .test_train_recipe import make_cfg, recipe_cmd, run

K = 32  # k-means units
N_TRAIN = 16  # utterances: 4 steps of 4 in an epoch, for both methods
COUNTS = ("text_tokens", "speech_positions", "audio_seconds")


@pytest.fixture(scope="module")
def paired(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The spoken corpus as audio, and as units in a folder whose encoding.json records 50 Hz."""
    root = tmp_path_factory.mktemp("counts")
    audio = write_spoken_corpus(root / "audio", {"train": N_TRAIN}, seconds_per_word=0.32)
    hubert = write_tiny_hubert(root / "hubert")
    np.save(root / "km.npy", np.random.default_rng(0).standard_normal((K, 32)).astype(np.float32))
    encode_audio(make_cfg("encode_audio", [
        f"encoder.model={hubert}", "encoder.layer=2", f"encoder.n_units={K}", f"encoder.kmeans={root / 'km.npy'}",
        f"source={audio}", "split=train", f"output_dir={root / 'units'}", "device=cpu", "progress=false",
    ]))  # fmt: skip
    return {"root": root, "audio": audio, "hubert": hubert, "units": root / "units"}


def args(method: str, model: Path, paired: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        "size=tiny", f"method={method}", "data=sft/paired_folder", f"data.units_source={paired['units']}",
        f"data.audio_source={paired['audio']}", f"model={model}", f"speech_encoder.model={paired['hubert']}",
        "speech_encoder.layer=2", "projector.hidden=64", "data.dev=null", "data.train.dataloader.batch_size=4",
        "data.train.dataloader.num_workers=0", f"output_dir={out}", "progress=false", "lr_scheduler.num_warmup_steps=1",
        "max_steps=100", "save_steps=1000", *extra,
    ]  # fmt: skip


def corpus_counts(method: str, model: Path, paired: dict[str, Path]) -> dict[str, float]:
    """One pass over the corpus, counted from its own files: text tokens by id in the examples the preset builds,
    units and their frame rate from the encoded folder, audio slots and seconds from the wav headers."""
    from ssi.data.config import build_dataset
    from ssi.model.methods.features import FeatureSettings, FeaturesMethod

    tokenizer = load_tokenizer(model)
    data = make_cfg("sft", args(method, model, paired, Path("/unused"))).data
    text = 0
    slots = FeaturesMethod(FeatureSettings(str(paired["hubert"]), layer=2), llm_dim=64).audio_slots
    built = build_dataset(data, "train", tokenizer, audio_slots=slots if method == "features" else None)
    for index in range(len(built.dataset)):
        tokens = np.asarray(built.dataset.build(index).tokens)
        text += int(((tokens >= 0) & (tokens < tokenizer.base_vocab_size)).sum())
    if method == "units":
        frame_rate = json.loads((paired["units"] / "encoding.json").read_text())["encoder"]["frame_rate"]
        frames = sum(
            len(units) for units in datasets.load_dataset(str(paired["units"]), split="train")["speech_tokens"]
        )
        return {"text_tokens": text, "speech_positions": frames, "audio_seconds": frames / frame_rate}
    samples = [soundfile.info(path).frames for path in sorted((paired["audio"] / "train").glob("*.wav"))]
    return {
        "text_tokens": text,
        "speech_positions": sum(slots(n) for n in samples),
        "audio_seconds": sum(samples) / 16000,
    }


def stops(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "logs" / run_dir.STOPS_FILE).read_text().splitlines()]


def training_state(out: Path, step: int) -> dict:
    (ckpt,) = (out / "checkpoints").glob(f"epoch_*/global_step_{step}")
    return torch.load(run_dir.training_state_dir(ckpt) / run_dir.TRAINING_STATE_FILE, weights_only=False)


@pytest.fixture(scope="module")
def epoch_runs(tiny_extended_dir: Path, paired: dict[str, Path]) -> dict[str, tuple[SpeechTrainingRecipe, Path]]:
    """One epoch of each method on the same utterances, checkpoints at steps 2 and 4."""
    runs = {}
    for method in ("units", "features"):
        out = paired["root"] / method
        recipe, code, _ = run("sft", args(method, tiny_extended_dir, paired, out, "epochs=1", "save_steps=2"))
        assert code == 0 and recipe.global_step == N_TRAIN // 4
        runs[method] = recipe, out
    return runs


@pytest.mark.parametrize("method", ["units", "features"])
def test_an_epoch_counts_text_speech_and_audio_seconds_of_the_corpus(tiny_extended_dir, paired, epoch_runs, method):
    recipe, out = epoch_runs[method]
    expected = corpus_counts(method, tiny_extended_dir, paired)
    totals = recipe.totals
    assert {k: totals[k] for k in COUNTS} == pytest.approx(expected, rel=1e-12)
    special = totals["tokens"] - totals["text_tokens"] - totals["speech_positions"]
    assert special > 0  # max_tokens counts text, speech and special positions (chat headers), no padding
    logged = metrics(out)
    for key in ("text_tokens", "speech_positions", "audio_seconds"):  # each step's own count, summing to the total
        assert sum(logged[step][key] for step in range(1, 5)) == pytest.approx(totals[key], rel=1e-9), key
    for key in (*COUNTS, "tokens"):  # the running totals, in the log at every checkpoint step and in its state
        assert logged[4][f"consumed_{key}"] == pytest.approx(totals[key], rel=1e-9), key
        assert training_state(out, 4)["totals"][key] == totals[key]
    assert logged[2]["consumed_audio_seconds"] < logged[4]["consumed_audio_seconds"]
    stop = stops(out)[-1]
    assert stop["reason"] == "epochs" and stop["text_tokens"] == totals["text_tokens"]
    assert stop["speech_positions"] == totals["speech_positions"]
    assert stop["audio_hours"] == pytest.approx(totals["audio_seconds"] / 3600)


def test_units_and_features_runs_read_the_same_audio(tiny_extended_dir, paired, epoch_runs) -> None:
    units, features = (epoch_runs[m][0].totals for m in ("units", "features"))
    # HuBERT's 25 ms windows every 20 ms fit one frame fewer than 20 ms would: 20 ms less audio per utterance
    assert features["audio_seconds"] - units["audio_seconds"] == pytest.approx(N_TRAIN * 0.02, abs=1e-9)
    # units: 50 positions per second; features: 10 (the projector stacks 5 frames; a part stack takes a slot)
    assert units["speech_positions"] == pytest.approx(50 * units["audio_seconds"])
    assert abs(features["speech_positions"] - 10 * features["audio_seconds"]) <= N_TRAIN


def test_resume_continues_the_counts(tiny_extended_dir, paired, epoch_runs, tmp_path) -> None:
    straight, out = epoch_runs["units"]
    (ckpt,) = (out / "checkpoints").glob("epoch_*/global_step_2")
    resumed, code, _ = run("sft", args("units", tiny_extended_dir, paired, tmp_path / "resumed", "epochs=1",
                                       "save_steps=2", "log_steps=3", f"resume_from_checkpoint={ckpt}"))  # fmt: skip
    assert code == 0 and resumed.global_step == 4
    assert {k: resumed.totals[k] for k in (*COUNTS, "tokens")} == {k: straight.totals[k] for k in (*COUNTS, "tokens")}
    at_end = metrics(tmp_path / "resumed")[4]  # not a logging step, but a checkpoint: its running totals are logged
    assert "loss" not in at_end and at_end["consumed_audio_seconds"] == pytest.approx(straight.totals["audio_seconds"])


@pytest.mark.slow
def test_two_ranks_count_what_one_counts(tiny_extended_dir, paired, epoch_runs, tmp_path) -> None:
    one = metrics(epoch_runs["units"][1])  # batch 4 x 1 rank
    two = args("units", tiny_extended_dir, paired, tmp_path / "two", "epochs=1", "save_steps=2",
               "data.train.dataloader.batch_size=2")  # 2 x 2 ranks: the same global batches  # fmt: skip
    done = subprocess.run(recipe_cmd("sft", two, nproc=2), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    logged = metrics(tmp_path / "two")
    for step in range(1, 5):
        for key in ("text_tokens", "speech_positions", "audio_seconds", *(f"consumed_{k}" for k in COUNTS)):
            assert logged[step][key] == pytest.approx(one[step][key], rel=1e-9), (step, key)


def test_an_audio_hour_budget_ends_both_methods_at_the_same_audio(tiny_extended_dir, paired, tmp_path) -> None:
    budget = 10.0 / 3600  # 10 s of audio: 2-3 steps of 4 utterances of 0.64-1.28 s
    ended = {}
    for method in ("units", "features"):
        out = tmp_path / method
        recipe, code, _ = run("sft", args(method, tiny_extended_dir, paired, out, f"max_audio_hours={budget}"))
        assert code == 0 and stops(out)[-1]["reason"] == "max_audio_hours"
        seconds = metrics(out)
        before = seconds[recipe.global_step - 1]["consumed_audio_seconds"]
        assert before < 10.0 <= recipe.totals["audio_seconds"]  # the first step boundary at or past the budget
        assert training_state(out, recipe.global_step)["stop_reason"] == "max_audio_hours"
        ended[method] = recipe.totals["audio_seconds"]
    assert abs(ended["units"] - ended["features"]) < 4 * 1.28  # within one step's audio

    out = tmp_path / "units"
    again = args("units", tiny_extended_dir, paired, out, f"max_audio_hours={budget}", "resume_from_checkpoint=latest")
    with pytest.raises(RecipeError, match=r"ended its run on max_audio_hours=.*: raise max_audio_hours to train"):
        SpeechTrainingRecipe(make_cfg("sft", again), "sft").setup()
    raised, code, _ = run("sft", [*again[:-1], f"max_audio_hours={2 * budget}", "resume_from_checkpoint=latest"])
    assert code == 0 and stops(out)[-1]["reason"] == "max_audio_hours" and raised.totals["audio_seconds"] >= 20.0


def test_deduplicated_units_count_no_audio_seconds_and_refuse_an_audio_budget(tiny_extended_dir, paired, tmp_path):
    dedup = args("units", tiny_extended_dir, paired, tmp_path / "run", "data.sequence.dedup=true", "max_steps=1")
    with pytest.raises(RecipeError, match=r"max_audio_hours: .*data.sequence.dedup=true"):
        SpeechTrainingRecipe(make_cfg("sft", [*dedup, "max_audio_hours=1"]), "sft").setup()
    recipe, code, _ = run("sft", dedup)
    assert code == 0 and recipe.totals["audio_seconds"] is None and recipe.totals["speech_positions"] > 0
    assert "audio_seconds" not in metrics(tmp_path / "run")[1]  # no figure rather than a wrong one
    assert "consumed_audio_seconds" not in metrics(tmp_path / "run")[1]


def test_the_report_shows_text_tokens_speech_positions_and_audio_hours(epoch_runs, tmp_path) -> None:
    runs = [epoch_runs[m][1] for m in ("units", "features")]
    assert report_main([*map(str, runs), "--output", str(tmp_path / "report"), "--no-plots"]) == 0
    with (tmp_path / "report/report.csv").open() as f:
        rows = {(Path(r["run_dir"]).name, int(r["step"])): r for r in csv.DictReader(f)}
    for method in ("units", "features"):
        totals = epoch_runs[method][0].totals
        at_end = rows[(method, 4)]
        assert int(at_end["text_tokens"]) == totals["text_tokens"]
        assert int(at_end["speech_positions"]) == totals["speech_positions"]
        assert float(at_end["audio_hours"]) == pytest.approx(totals["audio_seconds"] / 3600, rel=1e-9)
        assert float(rows[(method, 2)]["audio_hours"]) < float(at_end["audio_hours"])
    md = (tmp_path / "report/report.md").read_text()
    assert "| text tokens | speech positions | audio hours |" in md
    units = epoch_runs["units"][0].totals
    assert f"| {units['text_tokens']:,} | {units['speech_positions']:,} | {units['audio_seconds'] / 3600:.3g} |" in md


def test_budgets_read_their_totals_and_span_the_one_that_binds_first() -> None:
    budget = Budget(max_steps=1000, max_tokens=10_000, max_hours=2.0, max_audio_hours=0.05)
    at = {"tokens": 100, "wall_seconds": 60.0, "train_seconds": 60.0, "audio_seconds": 18.0}  # after 10 steps
    assert budget.reached(10, at) is None
    assert budget.reached(10, {**at, "audio_seconds": 180.0}) == "max_audio_hours"
    assert budget.reached(10, {**at, "tokens": 10_000, "audio_seconds": 180.0}) == "max_tokens"  # tokens first
    assert budget.exhausted(10, 0, {**at, "audio_seconds": 180.0}) == "max_audio_hours"
    assert budget.describe("max_audio_hours") == "max_audio_hours=0.05"
    assert budget.span_steps(10, at) == 100  # 180 s of audio at 1.8 s per step binds before 1,000 steps of tokens
    assert Budget(max_steps=1000, max_tokens=10_000).span_steps(10, at) == 1000
    with pytest.raises(BudgetError, match="max_audio_hours must be > 0"):
        Budget(max_steps=10, max_audio_hours=0)
    cfg = make_cfg("sft", ["size=tiny", "data=sft/synthetic", "model=/m", "output_dir=/o", "max_audio_hours=100"])
    assert Budget.from_config(cfg).max_audio_hours == 100.0
    # a checkpoint written before max_audio_hours existed saved its budget without it: the same budget
    assert Budget.from_saved({"max_steps": 1000, "max_tokens": None, "max_hours": None, "epochs": None}) == Budget(1000)
