"""The torchtune model built from config.json, at any size, checked against transformers' logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchtune.modules import TiedLinear

from ssi.model.architecture import CheckpointError, read_architecture
from ssi.model.builder import build_model
from ssi.model.checkpointer import SpeechCheckpointer
from ssi.testing import LLAMA_3_2_1B, LlamaShape, hub_config

from .test_model_checkpointer import (  # noqa: F401 (untied_extended_dir is a fixture)
    copy_dir,
    edit_json,
    hf_logits,
    input_ids,
    loaded_model,
    tune_logits,
    untied_extended_dir,
)

# --- build_model ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", ["tiny_extended_dir", "untied_extended_dir"])
def test_model_matches_transformers(fixture: str, request: pytest.FixtureRequest) -> None:
    model_dir = request.getfixturevalue(fixture)
    model = loaded_model(model_dir)
    arch = read_architecture(model_dir)
    assert isinstance(model.output, TiedLinear) == arch.tie_word_embeddings
    ids = input_ids(arch.vocab_size)
    torch.testing.assert_close(tune_logits(model, ids), hf_logits(model_dir, ids), atol=1e-5, rtol=0)


ROPE_CONFIGS = {
    # transformers 5 spelling: rope_theta inside rope_parameters; factors unlike the builder's defaults
    "llama3-custom": {
        "rope_scaling": None,
        "rope_theta": None,
        "rope_parameters": {
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "low_freq_factor": 2.0,
            "high_freq_factor": 16.0,
            "original_max_position_embeddings": 256,
        },
    },
    # Llama 3.0: plain RoPE, no scaling
    "unscaled": {"rope_scaling": None, "rope_theta": 500000.0},
}


@pytest.mark.parametrize("rope", sorted(ROPE_CONFIGS))
def test_rope_configuration_is_honoured(rope: str, tiny_extended_dir: Path, tmp_path: Path) -> None:
    model_dir = copy_dir(tiny_extended_dir, tmp_path / "model")
    edit_json(model_dir / "config.json", **ROPE_CONFIGS[rope])
    model = loaded_model(model_dir)
    ids = input_ids(read_architecture(model_dir).vocab_size, seq_len=256)
    logits, reference = tune_logits(model, ids), hf_logits(model_dir, ids)
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=0)
    # the same weights under the hub's rope differ by far more than the tolerance: the check has teeth
    hub_rope = loaded_model(tiny_extended_dir)
    hub_rope.load_state_dict(model.state_dict())
    error = (logits - reference).abs().max()
    assert (tune_logits(hub_rope, ids) - reference).abs().max() > 10 * max(error, 1e-5)


def test_meta_device_build_materialises_like_torchtunes_distributed_recipe(
    tiny_extended_dir: Path, tmp_path: Path
) -> None:
    """FSDP recipes build on the meta device, allocate later and call rope_init() themselves (RoPE
    buffers are not in the state dict): the replaced RoPE must follow that path too."""
    model_dir = copy_dir(tiny_extended_dir, tmp_path / "model")
    edit_json(model_dir / "config.json", **ROPE_CONFIGS["llama3-custom"])
    with torch.device("meta"):
        model = build_model(model_dir)
    model.to_empty(device="cpu")
    for module in model.modules():
        if hasattr(module, "rope_init"):
            module.rope_init()
    model.load_state_dict(SpeechCheckpointer(model_dir, progress=False).load_checkpoint()["model"])
    ids = input_ids(read_architecture(model_dir).vocab_size, seq_len=64)
    torch.testing.assert_close(tune_logits(model.eval(), ids), hf_logits(model_dir, ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("shape", "n_params"),
    [(LLAMA_3_2_1B, 1_235_814_400), (LlamaShape(3072, 28, 24, 8, 1.0, 256), 3_212_749_824)],
    ids=["Llama-3.2-1B", "Llama-3.2-3B"],
)
def test_build_model_at_real_sizes(shape: LlamaShape, n_params: int) -> None:
    """Published parameter counts of Llama 3.2 1B / 3B, built from their config.json on the meta device."""
    config = hub_config(shape, 128000, torch.bfloat16)
    with torch.device("meta"):
        model = build_model(config, max_seq_len=2048)
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert len(model.layers) == shape.num_layers
    attn = model.layers[0].attn
    assert (attn.num_heads, attn.num_kv_heads, attn.head_dim) == (shape.num_heads, shape.num_kv_heads, shape.head_dim)
    assert model.layers[0].mlp.w1.out_features == shape.intermediate_size
    assert attn.pos_embeddings.scale_factor == 32.0


def test_build_model_reads_every_size_field() -> None:
    config = hub_config(LlamaShape(96, 3, 3, 1, tie_word_embeddings=False), 500, torch.float32)
    config |= {"rms_norm_eps": 1e-6, "max_position_embeddings": 512, "intermediate_size": 200}
    model = build_model(config)
    assert model.tok_embeddings.weight.shape == (756, 96)
    assert model.output.weight.shape == (756, 96)
    assert len(model.layers) == 3
    assert model.layers[2].attn.k_proj.weight.shape == (32, 96)
    assert model.layers[0].mlp.w2.weight.shape == (96, 200)
    assert model.norm.eps == 1e-6
    assert model.max_seq_len == 512
    assert model.layers[0].attn.pos_embeddings.cache.shape[0] == 512


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "'yarn' is not supported"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "'linear' is not supported"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "lacks"),
        ({"head_dim": 64}, "head_dim=64"),
        ({"attention_bias": True}, "attention_bias=True"),
        ({"mlp_bias": True}, "mlp_bias=True"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"hidden_size": None}, "'hidden_size' is missing"),
        ({"num_key_value_heads": 3}, "do not divide evenly"),
        ({"model_type": "mistral"}, "expected 'llama'"),
    ],
)
def test_unrepresentable_configs_are_refused(change: dict, message: str) -> None:
    config = hub_config(LlamaShape(), 2000, torch.float32)
    for key, value in change.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    with pytest.raises(CheckpointError, match=message):
        build_model(config)
