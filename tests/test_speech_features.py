"""The continuous-features method's model parts: a speech encoder's features at a layer, and the projector."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ssi.encode.fixtures import write_tiny_hubert, write_tiny_whisper
from ssi.model.projector import FrameStackProjector
from ssi.model.speech_encoder import SpeechEncoder, SpeechEncoderError


@pytest.fixture(scope="module")
def encoders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("speech-encoders")
    return {
        "hubert": write_tiny_hubert(root / "hubert"),
        "hubert-base": write_tiny_hubert(root / "hubert-base", group_norm=True),
        "whisper": write_tiny_whisper(root / "whisper"),
    }


def waves(*seconds: float, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(int(s * 16000)).astype(np.float32) * 0.1 for s in seconds]


@pytest.mark.parametrize(("kind", "layer"), [("hubert", 2), ("hubert", -1), ("hubert-base", 3), ("whisper", 1)])
def test_a_padded_utterance_gives_its_unpadded_features(encoders, kind, layer) -> None:
    encoder = SpeechEncoder(encoders[kind], layer=layer).eval()
    batch = waves(1.0, 2.5, 0.37)
    with torch.no_grad():
        together = encoder(batch)
        alone = [encoder([w])[0] for w in batch]
    for wave, a, b in zip(batch, together, alone, strict=True):
        assert a.shape == (encoder.n_frames(len(wave)), encoder.dim)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert encoder.frame_rate == 50.0


def test_the_layer_is_the_transformers_hidden_state_of_that_layer(encoders) -> None:
    from transformers import AutoModel

    wave = waves(1.2)
    reference = AutoModel.from_pretrained(encoders["hubert"]).eval()
    fe = SpeechEncoder(encoders["hubert"], layer=2).feature_extractor
    inputs = fe(wave, sampling_rate=16000, return_tensors="pt")
    with torch.no_grad():
        hidden = reference(inputs["input_values"], output_hidden_states=True).hidden_states
        ours = SpeechEncoder(encoders["hubert"], layer=2).eval()(wave)[0]
        last = SpeechEncoder(encoders["hubert"], layer=-1).eval()(wave)[0]
    torch.testing.assert_close(ours, hidden[2][0], rtol=0, atol=1e-6)  # output of layer 2, no final norm
    torch.testing.assert_close(last, reference(inputs["input_values"]).last_hidden_state[0], rtol=0, atol=1e-6)


def test_whisper_audio_longer_than_its_window_is_encoded_window_by_window(encoders) -> None:
    encoder = SpeechEncoder(encoders["whisper"], layer=-1).eval()
    (long,) = waves(31.3)
    with torch.no_grad():
        features = encoder([long])[0]
        first = encoder([long[: 30 * 16000]])[0]
        rest = encoder([long[30 * 16000 :]])[0]
    assert features.shape[0] == encoder.n_frames(len(long)) == 1565  # 50 frames per second, trimmed
    torch.testing.assert_close(features, torch.cat([first, rest]), rtol=0, atol=0)


def test_unknown_encoders_and_layers_are_refused(encoders, tmp_path) -> None:
    with pytest.raises(SpeechEncoderError, match=r"speech_encoder.layer=9: .* has transformer layers 1..4"):
        SpeechEncoder(encoders["hubert"], layer=9)
    with pytest.raises(SpeechEncoderError, match="not a transformers model directory"):
        SpeechEncoder(tmp_path)


def test_the_projector_stacks_frames_and_keeps_the_last_partial_group() -> None:
    projector = FrameStackProjector(in_dim=4, out_dim=6, downsample=5, hidden=8)
    features = torch.randn(12, 4)
    out = projector(features)
    assert out.shape == (3, 6) and projector.n_outputs(12) == 3
    padded = torch.cat([features, torch.zeros(3, 4)])  # 12 frames + 3 zero frames = 3 whole groups
    torch.testing.assert_close(out, projector(padded))
    stacked = features[:10].reshape(2, 20)  # frames 0-4 and 5-9, each group's frames side by side
    manual = projector.linear2(torch.relu(projector.linear1(stacked)))
    torch.testing.assert_close(out[:2], manual)
