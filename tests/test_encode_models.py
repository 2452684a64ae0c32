"""Encoders: layer numbering, units equal to plain transformers, padded batches equal single utterances,
k-means files of every accepted format, nearest-centroid search, and clear refusals."""

from __future__ import annotations

import shutil
from pathlib import Path

import joblib
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from sklearn.cluster import MiniBatchKMeans

from ssi.config import to_container
from ssi.encode import EncodeError
from ssi.encode.batching import plan_batches, run_batched
from ssi.encode.encoders import EncoderPreset, LayerFeatures, build_encoder
from ssi.encode.fixtures import synthetic_wave, write_tiny_hubert, write_tiny_mimi
from ssi.encode.kmeans import NearestCentroid, load_centroids, save_centroids

CONF = Path(__file__).resolve().parents[1] / "conf"
CPU = torch.device("cpu")
LENGTHS = [16000, 9000, 12345, 400, 15999]  # samples at 16 kHz; 400 = one HuBERT frame


@pytest.fixture(scope="module")
def hubert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_hubert(tmp_path_factory.mktemp("hubert") / "hubert")


@pytest.fixture(scope="module")
def mimi_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_mimi(tmp_path_factory.mktemp("mimi") / "mimi")


def waves(lengths: list[int], rate: int = 16000) -> list[np.ndarray]:
    return [synthetic_wave(n / rate, rate, 1, 3, seed=i)[:, 0] for i, n in enumerate(lengths)]


def hubert_preset(model: Path, layer: int = 2, n_units: int = 32, kmeans: Path | None = None) -> dict:
    return {
        "name": "tiny_hubert",
        "n_units": n_units,
        "sampling_rate": 16000,
        "downsampling_ratio": 320,
        "backend": "ssl_kmeans",
        "model": str(model),
        "layer": layer,
        "kmeans": None if kmeans is None else str(kmeans),
    }


def mimi_preset(model: Path, n_units: int = 256) -> dict:
    return {
        "name": "tiny_mimi",
        "n_units": n_units,
        "sampling_rate": 24000,
        "downsampling_ratio": 1920,
        "backend": "mimi",
        "model": str(model),
        "codebook": 0,
    }


def features_of(model: Path, layer: int) -> LayerFeatures:
    return LayerFeatures(model, layer, EncoderPreset.from_config(hubert_preset(model, layer)), CPU, torch.float32)


def centroids_from_features(model: Path, layer: int, k: int, path: Path) -> Path:
    """k frames of real features as centroids, so that units vary from frame to frame."""
    frames = torch.cat(features_of(model, layer)(waves([16000, 12000], 16000))).numpy()
    np.save(path, frames[np.random.default_rng(0).choice(len(frames), size=k, replace=False)])
    return path


# --- HuBERT-like layer features --------------------------------------------------------------------


def test_layer_n_is_the_output_of_transformer_layer_n_without_the_final_norm(hubert_dir: Path) -> None:
    from transformers import HubertModel

    full = HubertModel.from_pretrained(hubert_dir).eval()
    wave = waves([16000])[0]
    features = features_of(hubert_dir, 1)
    x = features.fe(wave, sampling_rate=16000, return_tensors="pt")["input_values"]
    with torch.no_grad():
        out = full(x, output_hidden_states=True)
        hidden = full.feature_extractor(x).transpose(1, 2)  # layers one by one, by hand
        hidden = full.feature_projection(hidden)
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        hidden = hidden + full.encoder.pos_conv_embed(hidden)
        by_hand = []
        for layer in full.encoder.layers:
            hidden = layer(hidden)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
            by_hand.append(hidden[0])
    for n in range(1, 5):
        got = features_of(hubert_dir, n)([wave])[0]
        torch.testing.assert_close(got, by_hand[n - 1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got, out.hidden_states[n][0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(by_hand[-1], out.last_hidden_state[0], atol=1e-3)  # the final layer norm is not taken


@pytest.mark.parametrize("model_type", ["wav2vec2", "wavlm", "data2vec-audio"])
def test_other_hubert_like_models_number_layers_the_same(model_type: str, tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoModel, Wav2Vec2FeatureExtractor

    sizes = {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2, "intermediate_size": 64,
             "conv_dim": (32,) * 7, "num_conv_pos_embeddings": 5}  # fmt: skip
    torch.manual_seed(0)
    AutoModel.from_config(AutoConfig.for_model(model_type, **sizes)).save_pretrained(tmp_path / "m")
    Wav2Vec2FeatureExtractor(return_attention_mask=True).save_pretrained(tmp_path / "m")
    full = AutoModel.from_pretrained(tmp_path / "m").eval()
    wave = waves([16000])[0]
    for n in range(1, 4):
        features = features_of(tmp_path / "m", n)
        x = features.fe(wave, sampling_rate=16000, return_tensors="pt")["input_values"]
        with torch.no_grad():
            expected = full(x, output_hidden_states=True).hidden_states[n][0]
        torch.testing.assert_close(features([wave])[0], expected, atol=1e-5, rtol=1e-5)


def test_units_equal_plain_transformers_and_padding_changes_nothing(hubert_dir: Path, tmp_path: Path) -> None:
    from transformers import HubertModel

    km = centroids_from_features(hubert_dir, 3, 32, tmp_path / "km.npy")
    encoder = build_encoder(hubert_preset(hubert_dir, 3, 32, km), CPU, torch.float32)
    assert encoder.min_samples == 400 and encoder.padding_exact(12345)
    audio = waves(LENGTHS)
    singles = [encoder.encode([w])[0] for w in audio]
    batched = encoder.encode(audio)  # one padded batch with an attention mask
    assert [len(u) for u in singles] == [49, 27, 38, 1, 49]  # floor((n - 400) / 320) + 1
    for single, padded in zip(singles, batched, strict=True):
        np.testing.assert_array_equal(single, padded)
    assert len(np.unique(np.concatenate(singles))) > 5

    full = HubertModel.from_pretrained(hubert_dir).eval()
    centroids = np.load(km)
    for wave, units in zip(audio, singles, strict=True):
        x = encoder.features.fe(wave, sampling_rate=16000, return_tensors="pt")["input_values"]
        with torch.no_grad():
            feats = full(x, output_hidden_states=True).hidden_states[3][0].numpy()
        expected = ((feats[:, None, :] - centroids[None]) ** 2).sum(-1).argmin(1)
        np.testing.assert_array_equal(units, expected)


def test_group_norm_models_are_never_padded(tmp_path: Path) -> None:
    model = write_tiny_hubert(tmp_path / "base", group_norm=True)
    features = features_of(model, 2)
    assert not features.uses_mask
    audio = waves([16000, 9000])
    alone = features([audio[1]])[0]
    padded = features(audio)[1]
    assert not torch.allclose(alone, padded, atol=1e-3)  # why: group norm over the padding
    encoder = build_encoder(
        hubert_preset(model, 2, 16, centroids_from_features(model, 2, 16, tmp_path / "k.npy")), CPU, torch.float32
    )
    assert not encoder.padding_exact(9000)
    assert plan_batches([16000, 9000, 9000], 10**9, 64, encoder.padding_exact) == [[0], [1, 2]]
    batched = run_batched([*audio, audio[1]], encoder.encode, 10**9, 64, encoder.padding_exact)
    for wave, units in zip([*audio, audio[1]], batched, strict=True):
        np.testing.assert_array_equal(units, encoder.encode([wave])[0])


# --- Mimi -------------------------------------------------------------------------------------------


def test_mimi_codebook_zero_batched_equals_single_and_plain_transformers(mimi_dir: Path) -> None:
    from transformers import MimiModel

    encoder = build_encoder(mimi_preset(mimi_dir), CPU, torch.float32)
    lengths = [24000, 1920 * 7, 1920 * 7 + 5, 36000, 1, 1920 * 3]
    audio = waves(lengths, 24000)
    singles = [encoder.encode([w])[0] for w in audio]
    assert [len(u) for u in singles] == [-(-n // 1920) for n in lengths]  # ceil(N / 1920) frames at 12.5 Hz
    batched = run_batched(audio, encoder.encode, 10**9, 64, encoder.padding_exact)
    for single, from_batch in zip(singles, batched, strict=True):
        np.testing.assert_array_equal(single, from_batch)
    assert plan_batches(lengths, 10**9, 64, encoder.padding_exact) == [[3], [0], [2, 1, 5], [4]]

    model = MimiModel.from_pretrained(mimi_dir).eval()
    with torch.no_grad():
        codes = model.encode(torch.from_numpy(audio[0])[None, None], num_quantizers=1).audio_codes[0, 0].numpy()
    np.testing.assert_array_equal(singles[0], codes)
    assert len(np.unique(np.concatenate(singles))) > 5


def test_mimi_padding_changes_a_partial_last_frame_so_exact_batching_avoids_it(mimi_dir: Path) -> None:
    encoder = build_encoder(mimi_preset(mimi_dir), CPU, torch.float32)
    audio = waves([36000, 1920 * 7 + 5, 1920 * 7 + 900, 1920 * 4 + 33], 24000)
    padded = encoder.encode(audio)  # what batch.exact=false does: only the last partial frame may differ
    for wave, units in zip(audio[1:], padded[1:], strict=True):
        alone = encoder.encode([wave])[0]
        np.testing.assert_array_equal(units[:-1], alone[:-1])
    assert not encoder.padding_exact(1920 * 7 + 5) and encoder.padding_exact(1920 * 7)


def test_bf16_encoders_run(hubert_dir: Path, mimi_dir: Path, tmp_path: Path) -> None:
    """bf16 gives the fp32 frame counts; HuBERT's units nearly all agree, a random tiny Mimi's residual VQ
    does not (so units are recorded with their dtype, and fp32 is the default)."""
    km = centroids_from_features(hubert_dir, 2, 32, tmp_path / "km.npy")
    agreement = []
    for preset, rate in ((hubert_preset(hubert_dir, 2, 32, km), 16000), (mimi_preset(mimi_dir), 24000)):
        audio = waves([rate, rate // 2 + 7], rate)
        fp32 = build_encoder(preset, CPU, torch.float32).encode(audio)
        bf16 = build_encoder(preset, CPU, torch.bfloat16)
        assert bf16.identity()["dtype"] == "bfloat16"
        units = run_batched(audio, bf16.encode, 10**9, 64, bf16.padding_exact)
        assert [len(u) for u in units] == [len(u) for u in fp32]
        agreement.append(np.mean(np.concatenate(units) == np.concatenate(fp32)))
    assert agreement[0] > 0.9


# --- batching -----------------------------------------------------------------------------------------


def test_batches_are_longest_first_and_bounded() -> None:
    lengths = [5, 30, 10, 30, 20, 100]
    batches = plan_batches(lengths, max_samples=60, max_rows=3, padding_exact=lambda n: True)
    assert batches == [[5], [1, 3], [4, 2, 0]]
    for batch in batches:
        assert len(batch) == 1 or len(batch) * max(lengths[i] for i in batch) <= 60
    assert sorted(i for b in batches for i in b) == list(range(6))
    assert plan_batches([4, 4, 3], 100, 8, padding_exact=lambda n: False) == [[0, 1], [2]]


# --- k-means files and assignment ------------------------------------------------------------------------


def test_nearest_centroid_matches_sklearn_predict() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3000, 24)).astype(np.float32)
    km = MiniBatchKMeans(n_clusters=50, n_init=1, random_state=0, batch_size=1024).fit(x)
    nearest = NearestCentroid(km.cluster_centers_, CPU)
    nearest.block_rows = 128  # several blocks
    np.testing.assert_array_equal(nearest(torch.from_numpy(x)).numpy(), km.predict(x))


def test_kmeans_files_of_every_format(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((500, 8)).astype(np.float32)
    km = MiniBatchKMeans(n_clusters=10, n_init=1, random_state=0).fit(x)
    joblib.dump(km, tmp_path / "kmeans_model")  # Spire's file has no suffix
    np.save(tmp_path / "c.npy", km.cluster_centers_)
    save_centroids(tmp_path / "c.safetensors", km.cluster_centers_, {"layer": "6"})
    for name in ("kmeans_model", "c.npy", "c.safetensors"):
        loaded = load_centroids(tmp_path / name)
        assert (loaded.k, loaded.dim) == (10, 8) and len(loaded.sha256) == 64
        np.testing.assert_array_equal(loaded.values, km.cluster_centers_.astype(np.float32))
    assert load_centroids(tmp_path / "c.safetensors").metadata["layer"] == "6"
    with pytest.raises(FileExistsError):
        save_centroids(tmp_path / "c.safetensors", km.cluster_centers_, {})
    (tmp_path / "bad.joblib").write_text("not a pickle")
    with pytest.raises(EncodeError, match=r"cannot read k-means file .*bad.joblib.*expected a joblib/pickle"):
        load_centroids(tmp_path / "bad.joblib")
    joblib.dump({"a": 1}, tmp_path / "dict.joblib")
    with pytest.raises(EncodeError, match="a pickled dict, not a fitted k-means"):
        load_centroids(tmp_path / "dict.joblib")
    np.save(tmp_path / "flat.npy", np.zeros(5, dtype=np.float32))
    with pytest.raises(EncodeError, match=r"must be a \(k, dim\) array, got shape \(5,\)"):
        load_centroids(tmp_path / "flat.npy")


# --- refusals --------------------------------------------------------------------------------------------


def test_kmeans_and_model_mismatches_are_refused(hubert_dir: Path, mimi_dir: Path, tmp_path: Path) -> None:
    np.save(tmp_path / "k32d32.npy", np.zeros((32, 32), dtype=np.float32))
    np.save(tmp_path / "k32d16.npy", np.zeros((32, 16), dtype=np.float32))
    good = hubert_preset(hubert_dir, 2, 32, tmp_path / "k32d32.npy")
    cases = [
        ({**good, "n_units": 64}, r"has k=32 centroids but encoder 'tiny_hubert' says n_units=64"),
        ({**good, "kmeans": str(tmp_path / "k32d16.npy")}, r"dimension 16 but .* layer 2 has 32 features"),
        ({**good, "kmeans": None}, r"needs a k-means file: pass encoder.kmeans=<file>"),
        ({**good, "layer": 5}, r"encoder.layer=5: .* has transformer layers 1..4"),
        ({**good, "model": str(mimi_dir)}, r"model_type 'mimi'; backend ssl_kmeans needs one of"),
        ({**good, "downsampling_ratio": 640}, r"320 samples per frame but .* downsampling_ratio=640"),
        (
            {**good, "model": str(tmp_path / "nowhere")},
            r"encoder.model=.*nowhere: no such local file or folder.*encoder.model=<its local directory>",
        ),
        (mimi_preset(mimi_dir, 2048), r"codebooks of 256 entries but encoder 'tiny_mimi' says n_units=2048"),
        ({**mimi_preset(mimi_dir), "codebook": 2}, r"encoder.codebook=2: .* has codebooks 0..1"),
    ]
    for preset, message in cases:
        with pytest.raises(EncodeError, match=message):
            build_encoder(preset, CPU, torch.float32)
    no_fe = tmp_path / "no-fe"
    shutil.copytree(hubert_dir, no_fe)
    (no_fe / "preprocessor_config.json").unlink()
    with pytest.raises(EncodeError, match="has no preprocessor_config.json"):
        build_encoder(hubert_preset(no_fe, 2, 32, tmp_path / "k32d32.npy"), CPU, torch.float32)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("speechtokenizer_rvq0", "speechtokenizer package .* torchaudio"),
        ("focalcodec_50hz", "FocalCodec is published only through torch.hub"),
        ("synthetic", "there is no audio encoder"),
    ],
)
def test_unsupported_presets_are_refused_with_their_reason(name: str, reason: str) -> None:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("encode_audio", overrides=[f"encoder={name}", "source=x", "output_dir=y"])
    with pytest.raises(EncodeError, match=f"encoder {name!r} cannot be encoded here: .*{reason}"):
        build_encoder(to_container(cfg.encoder), CPU, torch.float32)
