"""Likelihood benchmarks on a model trained here: a few CPT steps on the synthetic corpus clearly beat the
untrained model; the shared-prefix forward equals separate forwards; scores reach the run's TensorBoard and
W&B (offline) at the checkpoint's step; every checkpoint of the run is evaluated locally and on Slurm.

The trained run is built once per session (`trained_run`) and reused by tests/test_eval_vllm.py and
tests/test_generate_beam.py.
"""

from __future__ import annotations

import gc
import json
import shutil
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from ssi import loggers
from ssi.data.synthetic import SyntheticSpec, make_synthetic_dataset
from ssi.eval.converters.synthetic import synthetic_items
from ssi.eval.items import Item, Segment, write_items
from ssi.eval.likelihood import score_torch
from ssi.eval.pipeline import run_evaluation
from ssi.eval.sequences import SequenceBuilder, SequenceSettings
from ssi.generate.every_checkpoint import main as evaluate_run
from ssi.model.checkpointer import SpeechCheckpointer
from ssi.model.engines import load_torch_model
from ssi.run_dir import list_checkpoints
from ssi.train.recipe import run_recipe
from ssi.vocab.tiktoken import load_tokenizer

from .conftest import N_TEST_DSUS
from .slurm_cluster import needs_slurm
from .test_train_recipe import make_cfg, run

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
STEPS, SAVE_EVERY = 40, 20
BENCHMARK = "synthetic_test"


@dataclass(frozen=True)
class TrainedRun:
    run: Path
    corpus: Path
    benchmark: Path
    wandb_env: dict[str, str]

    def checkpoint(self, step: int) -> Path:
        return next(c.path for c in list_checkpoints(self.run) if c.step == step)


def wandb_env(root: Path) -> dict[str, str]:
    """Offline W&B that keeps everything under `root` (nothing in the home directory, no network)."""
    home = root / "wandb-home"
    return {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_CONFIG_DIR": str(home / "config"),
        "WANDB_CACHE_DIR": str(home / "cache"),
        "WANDB_DATA_DIR": str(home / "data"),
    }


def trained_run(tmp_path_factory: pytest.TempPathFactory, base_model: Path) -> TrainedRun:
    """A CPT run of 40 steps (checkpoints at 20 and 40; TensorBoard and offline W&B on) on a synthetic corpus,
    and the synthetic benchmark of its test split; built once per session, whichever module asks first."""
    root = tmp_path_factory.getbasetemp() / "eval-trained-run"
    env = wandb_env(root)
    made = TrainedRun(root / "run", root / "corpus", root / f"{BENCHMARK}.jsonl", env)
    if (root / "done").exists():
        return made
    shutil.rmtree(root, ignore_errors=True)
    spec = SyntheticSpec(n_train=160, n_validation=8, n_test=60, n_units=N_TEST_DSUS, seed=5)
    make_synthetic_dataset(made.corpus, spec, progress=False)
    write_items(made.benchmark, synthetic_items(made.corpus, "test", None, seed=0))
    overrides = [
        "size=tiny",
        "data=cpt/synthetic",
        f"data.train.dataset.source={made.corpus}",
        f"model={base_model}",
        f"output_dir={made.run}",
        "progress=false",
        "data.sequence.dedup=true",
        "data.train.dataloader.batch_size=8",
        "optimizer.lr=2e-3",
        "lr_scheduler.num_warmup_steps=5",
        f"max_steps={STEPS}",
        f"save_steps={SAVE_EVERY}",
        "eval_steps=1000",
        "metric_logger.tensorboard.enabled=true",
        "metric_logger.wandb.enabled=true",
        "metric_logger.wandb.project=ssi-tests",
    ]
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        recipe, code, _ = run("cpt", overrides)
        assert code == 0
        del recipe  # torchtune's W&B logger finishes the current W&B run when collected: not later, mid-evaluation
        gc.collect()
    (root / "done").touch()
    return made


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_extended_dir: Path):
    made = trained_run(tmp_path_factory, tiny_extended_dir)
    with pytest.MonkeyPatch.context() as patch:
        for key, value in made.wandb_env.items():
            patch.setenv(key, value)  # evaluation logs to W&B too, here and in the subprocesses of evaluate_run
        yield made


def eval_cfg(*overrides: str):
    return make_cfg("evaluate", ["progress=false", *overrides])


@pytest.fixture(scope="module")
def trained_summary(trained: TrainedRun) -> dict:
    """The default command on the last checkpoint: results in the run, metrics to its loggers."""
    return run_evaluation(eval_cfg(f"model={trained.checkpoint(STEPS)}", f"benchmark={trained.benchmark}"))


def test_a_few_training_steps_clearly_beat_the_untrained_model(
    trained: TrainedRun, trained_summary: dict, tiny_extended_dir: Path, tmp_path: Path
) -> None:
    untrained = run_evaluation(
        eval_cfg(
            f"model={tiny_extended_dir}",
            f"benchmark={trained.benchmark}",
            f"output_dir={tmp_path}",
            "sequence.dedup=true",  # as the run builds its sequences
        )
    )
    print(f"untrained {untrained['accuracy']:.3f}, after {STEPS} CPT steps {trained_summary['accuracy']:.3f}")
    assert untrained["n"] == trained_summary["n"] >= 55
    assert untrained["accuracy"] <= 0.7, "corrupted continuations should leave an untrained model near chance"
    assert trained_summary["accuracy"] >= 0.9
    for category in ("continuation", "whole utterance"):
        assert trained_summary["categories"][category]["n"] >= 25

    ckpt = trained.checkpoint(STEPS)
    out = trained.run / "evaluations" / ckpt.parent.name / f"global_step_{STEPS}" / BENCHMARK
    assert sorted(p.name for p in out.iterdir()) == ["scores.jsonl", "summary.json"]
    assert json.loads((out / "summary.json").read_text())["accuracy"] == trained_summary["accuracy"]
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert len(rows) == trained_summary["n"]
    assert set(rows[0]) == {
        "id",
        "category",
        "positive",
        "negative",
        "correct",
        "n_positive_tokens",
        "n_negative_tokens",
    }
    assert sum(r["correct"] for r in rows) / len(rows) == pytest.approx(trained_summary["accuracy"])
    assert trained_summary["sequence"]["dedup"] is True
    assert trained_summary["sequence"]["source"] == f"{trained.run.resolve()}/torchtune_config.yaml (data.sequence)"
    assert trained_summary["global_step"] == STEPS and trained_summary["backend"] == "torch"
    # mean per token ranks this benchmark the same way: both candidates have as many tokens
    mean = run_evaluation(
        eval_cfg(f"model={ckpt}", f"benchmark={trained.benchmark}", "score=mean", f"output_dir={tmp_path}/m")
    )
    assert mean["accuracy"] == trained_summary["accuracy"] and mean["score"] == "mean"


def mixed_items(corpus: Path) -> list[Item]:
    """Every direction: speech -> speech, text -> text, speech -> text, text -> speech, none, and a tie."""
    items = synthetic_items(corpus, "test", 6, seed=1)
    return [
        *items,
        Item("t2t", Segment(text="the red cat"), Segment(text="runs cat the"), prefix=Segment(text="one big")),
        Item("s2t", Segment(text="the red cat"), Segment(text="red the cat"), prefix=items[0].positive),
        Item("t2s", items[1].positive, items[1].negative, prefix=Segment(text="the old dog sees")),
        Item("text", Segment(text="a small bird"), Segment(text="bird small a")),
        Item("tie", Segment(units=(4, 5, 6)), Segment(units=(4, 5, 6)), prefix=Segment(units=(1, 2))),
    ]


def separate_forward(model, tokens: list[int], start: int) -> float:
    """The plain computation: one causal forward over the whole sequence, nothing shared."""
    with torch.inference_mode():
        logits = model(torch.tensor([tokens]))[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return sum(logprobs[i - 1, tokens[i]].item() for i in range(start, len(tokens)))


def test_shared_prefix_forward_equals_separate_forwards(trained: TrainedRun) -> None:
    ckpt = trained.checkpoint(STEPS)
    tokenizer = load_tokenizer(ckpt)
    builder = SequenceBuilder(tokenizer, SequenceSettings(True, True, True, True, "test"))
    pairs = [builder.pair(item) for item in mixed_items(trained.corpus)]
    model = load_torch_model(SpeechCheckpointer(ckpt, progress=False), 512, torch.device("cpu"), torch.float32)
    batched = score_torch(
        model, pairs, batch_size=4, pad_id=tokenizer.pad_id, device=torch.device("cpu"), progress=False
    )
    alone = score_torch(model, pairs, batch_size=1, pad_id=tokenizer.pad_id, device=torch.device("cpu"), progress=False)
    for pair, (pos, neg), (pos1, neg1) in zip(pairs, batched, alone, strict=True):
        for seq, (total, count), (total1, _) in ((pair[0], pos, pos1), (pair[1], neg, neg1)):
            assert count == seq.n_scored
            assert total == pytest.approx(separate_forward(model, seq.tokens, seq.start), abs=1e-4)
            assert total == pytest.approx(total1, abs=1e-5)  # padding and batch neighbours change nothing
    assert batched[-1][0] == batched[-1][1]  # identical candidates tie exactly


def wandb_history(run_file: Path) -> list[dict[str, str]]:
    """History rows of an offline W&B run file (a leveldb-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, record, rows = run_file.read_bytes(), 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        record += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last fragment of one
            parsed = pb.Record.FromString(record)
            if parsed.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): i.value_json for i in parsed.history.item})
            record = b""
    return rows


def tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of a TensorBoard directory (torchtune writes them as new-style tensor summaries)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util.tensor_util import make_ndarray

    events = EventAccumulator(str(log_dir), size_guidance={"tensors": 0})
    events.Reload()
    return {
        tag: [(e.step, float(make_ndarray(e.tensor_proto))) for e in events.Tensors(tag)]
        for tag in events.Tags()["tensors"]
    }


def test_scores_reach_the_runs_tensorboard_and_wandb(trained: TrainedRun, trained_summary: dict) -> None:
    scalars = tensorboard_scalars(trained.run / "logs" / "tensorboard")
    assert len(scalars["loss"]) >= 4  # the training curves live here too
    (point,) = [value for step, value in scalars[f"eval/{BENCHMARK}/accuracy"] if step == STEPS]
    assert point == pytest.approx(trained_summary["accuracy"])
    assert [step for step, _ in scalars[f"eval/{BENCHMARK}/whole_utterance"]] == [STEPS]

    recorded = json.loads((trained.run / "logs" / "wandb_run.json").read_text())
    runs = sorted((trained.run / "wandb").glob(f"offline-run-*-{recorded['id']}/run-{recorded['id']}.wandb"))
    assert len(runs) >= 2, "evaluation should append to the training run's W&B id"
    training_rows = wandb_history(runs[0])
    assert any("loss" in row for row in training_rows)
    evaluation_rows = [r for f in runs[1:] for r in wandb_history(f) if f"eval/{BENCHMARK}/accuracy" in r]
    assert evaluation_rows and float(evaluation_rows[-1]["global_step"]) == STEPS
    assert float(evaluation_rows[-1][f"eval/{BENCHMARK}/accuracy"]) == pytest.approx(trained_summary["accuracy"])


def run_command(args: list[str], capsys) -> tuple[int, str, str]:
    code = evaluate_run(args, REPO)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_every_checkpoint_locally(trained: TrainedRun, trained_summary: dict, capsys) -> None:
    run, bench = trained.run, trained.benchmark
    generate_args = [
        "generate.data=sft/synthetic",
        f"generate.data.train.dataset.source={trained.corpus}",
        "generate.backend=torch",
        "generate.sampling_params.max_tokens=4",
        "generate.progress=false",
        "evaluate.progress=false",
    ]
    code, out, _ = run_command(
        [f"run={run}", "last=1", "test_sets=[test]", f"benchmarks=[{bench}]", *generate_args], capsys
    )
    assert code == 0, out
    assert "1 checkpoints, 2 tasks, 1 already there, 1 to run" in out  # step 40's benchmark is done
    assert "evaluate_run: 1 done, 0 failed, 1 already there (1 tasks run, 2 in all)" in out  # as it opened
    ckpt = trained.checkpoint(STEPS)
    generated = run / "generations" / ckpt.parent.name / f"global_step_{STEPS}" / "corpus" / "test"
    assert (generated / "wer.json").is_file() and (generated / "generations.jsonl").is_file()
    wer = json.loads((generated / "wer.json").read_text())["wer"]
    assert tensorboard_scalars(run / "logs" / "tensorboard")["wer/corpus/test"] == [(STEPS, pytest.approx(wer))]

    code, out, _ = run_command([f"run={run}", "test_sets=[]", f"benchmarks=[{bench}]", "launcher=print"], capsys)
    assert code == 0 and "2 checkpoints, 2 tasks, 1 already there, 1 to run" in out
    (listed,) = [line for line in out.splitlines() if "scripts/evaluate.py" in line]
    assert f"model={trained.checkpoint(SAVE_EVERY)}" in listed
    code, out, _ = run_command(
        [f"run={run}", "test_sets=[]", f"benchmarks=[{bench}]", "evaluate.progress=false"], capsys
    )
    assert code == 0 and "evaluate_run: 1 done" in out
    step20 = trained.checkpoint(SAVE_EVERY)
    assert (
        run / "evaluations" / step20.parent.name / f"global_step_{SAVE_EVERY}" / BENCHMARK / "summary.json"
    ).is_file()
    code, out, _ = run_command([f"run={run}", "test_sets=[]", f"benchmarks=[{bench}]"], capsys)
    assert code == 0 and "2 already there, 0 to run" in out


def test_every_checkpoint_refuses_bad_input(trained: TrainedRun, tmp_path: Path, capsys) -> None:
    empty_run = tmp_path / "empty-run"
    (empty_run / "checkpoints").mkdir(parents=True)
    shutil.copy(trained.run / "torchtune_config.yaml", empty_run)
    bench = f"benchmarks=[{trained.benchmark}]"
    cases = [
        ([f"run={empty_run}", bench], f"{empty_run} has no complete checkpoint under {empty_run}/checkpoints"),
        ([f"run={tmp_path}", bench], f"{tmp_path} is not a training run directory (no torchtune_config.yaml)"),
        ([f"run={trained.run}", "test_sets=[]", f"benchmarks=[{tmp_path}/none.jsonl]"], "none.jsonl not found"),
        ([f"run={trained.run}", "test_sets=[]"], "nothing to do: give test_sets=[...] and/or benchmarks=[...]"),
        ([f"run={trained.run}", "last=0", bench], "last must be >= 1"),
        ([f"run={trained.run}", bench, "launcher=pbs"], "launcher must be one of ('local', 'slurm', 'print')"),
        (
            [f"run={trained.run}", "test_sets=[]", bench, "evaluate.scroe=mean"],
            "conf/evaluate.yaml has no setting 'scroe'; did you mean score",
        ),
        # a split no section reads is refused, never read from the test section under another name
        ([f"run={trained.run}", "test_sets=[test_other]"], "gen.split=test_other: no section of the preset reads"),
    ]
    for args, message in cases:
        code, _, err = run_command(args, capsys)
        assert code == 2 and message in err and err.count("\n") == 1, (args, err)


@pytest.mark.slurm
@needs_slurm
def test_every_checkpoint_as_a_slurm_array(trained: TrainedRun, tmp_path: Path, capsys) -> None:
    bench = tmp_path / "on_slurm.jsonl"
    shutil.copy(trained.benchmark, bench)
    args = [
        f"run={trained.run}",
        "test_sets=[]",
        f"benchmarks=[{bench}]",
        "launcher=slurm",
        "sbatch.gpus-per-node=0",  # the local cluster has no GPU; one CPU per task, short jobs
        "sbatch.cpus-per-task=1",
        "sbatch.time=00:10:00",
        "evaluate.progress=false",
    ]
    code, out, err = run_command(args, capsys)
    assert code == 0, err
    job = out.split("submitted Slurm array job ")[1].split(":")[0]
    task_list = Path(out.split("tasks listed in ")[1].split(",")[0])
    assert len(task_list.read_text().splitlines()) == 2
    deadline = time.monotonic() + 300
    while (
        time.monotonic() < deadline
        and subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout.strip()
    ):
        time.sleep(2)
    logs = {p.name: p.read_text() for p in task_list.parent.glob("task-*.out")}
    assert sorted(logs) == ["task-0.out", "task-1.out"], logs
    for ckpt in list_checkpoints(trained.run):
        out_dir = trained.run / "evaluations" / ckpt.path.parent.name / ckpt.path.name / "on_slurm"
        assert (out_dir / "summary.json").is_file(), logs
    code, out, _ = run_command(args, capsys)
    assert code == 0 and "2 already there, 0 to run" in out


@pytest.mark.parametrize("logger", ["tensorboard", "wandb"])
def test_a_logger_whose_package_is_missing_fails_in_one_line(
    logger: str, tiny_extended_dir: Path, synthetic_corpus_dir: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    monkeypatch.setitem(sys.modules, logger, None)  # Python's way to make a package unimportable
    assert not loggers.installed(logger)
    overrides = [
        "size=tiny",
        "data=cpt/synthetic",
        f"data.train.dataset.source={synthetic_corpus_dir}",
        f"model={tiny_extended_dir}",
        f"output_dir={tmp_path / 'run'}",
        f"metric_logger.{logger}.enabled=true",
    ]
    assert run_recipe(make_cfg("cpt", overrides), "cpt") == 2
    err = capsys.readouterr().err
    assert (
        f"error: metric_logger.{logger}.enabled=true needs the {logger} package: pip install -e '.[{logger}]'\n" in err
    )
    assert "Traceback" not in err and not (tmp_path / "run" / "checkpoints").exists()
