"""Tiny random encoders and synthetic audio datasets, for tests and bench/bench_encode.py (nothing downloads).

The models are built from configs with the real geometry that decides frames (HuBERT's 320-sample
convolution stack, Mimi's 1920-sample frames) and random weights; Mimi's codebooks are filled, since a
fresh `MimiModel` has all-zero codebooks and would give unit 0 everywhere. Audio is a few tones per
"word" plus noise, written in any format libsndfile writes (wav, flac, ogg, mp3), rate and channel count.
"""

from __future__ import annotations

import csv
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile
import torch

WORDS = ("the", "cat", "sat", "on", "a", "mat", "dog", "ran", "far", "away", "red", "blue", "sun", "sky")
SUBTYPES = {"wav": "PCM_16", "flac": "PCM_16", "ogg": "VORBIS", "mp3": "MPEG_LAYER_III"}


def write_tiny_hubert(
    path: Path, *, group_norm: bool = False, hidden_size: int = 32, layers: int = 4, seed: int = 0
) -> Path:
    """A HuBERT directory (config, weights, preprocessor_config.json). Default: the layer-norm ("large")
    kind with an attention mask; `group_norm`: the "base" kind, whose feature extractor has no mask."""
    from transformers import HubertConfig, HubertModel, Wav2Vec2FeatureExtractor

    torch.manual_seed(seed)
    config = HubertConfig(
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden_size,
        conv_dim=(32,) * 7,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
        do_stable_layer_norm=not group_norm,
        feat_extract_norm="group" if group_norm else "layer",
        conv_bias=not group_norm,
    )
    HubertModel(config).eval().save_pretrained(path)
    Wav2Vec2FeatureExtractor(
        sampling_rate=16000, do_normalize=True, return_attention_mask=not group_norm, padding_value=0.0
    ).save_pretrained(path)
    return Path(path)


def write_hubert_like(path: Path, *, hidden_size: int = 1024, layers: int = 24, seed: int = 0) -> Path:
    """A HuBERT directory with HuBERT Large's geometry (7 convolutions of 512 channels, 64-dim heads, FFN 4x
    hidden, layer norm and an attention mask) at any width and depth: the front-end cost of the real model,
    for benchmarks."""
    from transformers import HubertConfig, HubertModel, Wav2Vec2FeatureExtractor

    torch.manual_seed(seed)
    config = HubertConfig(
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden_size // 64),
        intermediate_size=4 * hidden_size,
        do_stable_layer_norm=True,
        feat_extract_norm="layer",
        conv_bias=True,
    )
    HubertModel(config).eval().save_pretrained(path)
    Wav2Vec2FeatureExtractor(
        sampling_rate=16000, do_normalize=True, return_attention_mask=True, padding_value=0.0
    ).save_pretrained(path)
    return Path(path)


def write_tiny_whisper(path: Path, *, d_model: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """A Whisper directory with a tiny random encoder (and decoder) and the real 80-mel, 30 s front end."""
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

    torch.manual_seed(seed)
    config = WhisperConfig(
        d_model=d_model,
        encoder_layers=layers,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=2 * d_model,
        decoder_ffn_dim=2 * d_model,
        num_mel_bins=80,
        vocab_size=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
        max_target_positions=32,
    )
    WhisperModel(config).eval().save_pretrained(path)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(path)
    return Path(path)


def write_tiny_mimi(path: Path, *, codebook_size: int = 256, seed: int = 0) -> Path:
    """A Mimi directory at 24 kHz / 12.5 Hz with random, filled codebooks of `codebook_size` (a power of 2)."""
    from transformers import EncodecFeatureExtractor, MimiConfig, MimiModel

    torch.manual_seed(seed)
    config = MimiConfig(
        hidden_size=32,
        num_filters=4,
        num_residual_layers=1,
        codebook_size=codebook_size,
        codebook_dim=16,
        num_quantizers=2,
        vector_quantization_hidden_dimension=16,
        num_hidden_layers=1,
        intermediate_size=64,
        num_attention_heads=2,
        num_key_value_heads=2,
        upsample_groups=32,
    )
    model = MimiModel(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("codebook.embed_sum"):
                buffer.copy_(torch.randn(buffer.shape, generator=gen))
    model.save_pretrained(path)
    EncodecFeatureExtractor(feature_size=1, sampling_rate=24000, padding_value=0.0).save_pretrained(path)
    return Path(path)


@dataclass(frozen=True)
class Clip:
    """One synthetic utterance: file name (without suffix), length and how it is stored."""

    name: str
    seconds: float
    sampling_rate: int = 16000
    channels: int = 1
    format: str = "wav"


def synthetic_wave(seconds: float, sampling_rate: int, channels: int, n_words: int, seed: int) -> np.ndarray:
    """(frames, channels) float32 in [-1, 1]: one two-tone segment per word, plus a little noise."""
    rng = np.random.default_rng(seed)
    n = max(1, round(seconds * sampling_rate))
    t = np.arange(n) / sampling_rate
    wave = np.zeros(n)
    bounds = np.linspace(0, n, n_words + 1).astype(int)
    for lo, hi in itertools.pairwise(bounds):
        f1, f2 = rng.uniform(150, 3000, size=2)
        wave[lo:hi] = 0.3 * np.sin(2 * np.pi * f1 * t[lo:hi]) + 0.2 * np.sin(2 * np.pi * f2 * t[lo:hi])
    wave += 0.02 * rng.standard_normal(n)
    stereo = np.stack([wave * (1 - 0.2 * c) for c in range(channels)], axis=1)
    return np.clip(stereo, -1, 1).astype(np.float32)


def write_clip(folder: Path, clip: Clip, n_words: int, seed: int) -> Path:
    path = Path(folder) / f"{clip.name}.{clip.format}"
    wave = synthetic_wave(clip.seconds, clip.sampling_rate, clip.channels, n_words, seed)
    soundfile.write(path, wave, clip.sampling_rate, format=clip.format.upper(), subtype=SUBTYPES[clip.format])
    return path


def transcript(n_words: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed + 7919)
    return [WORDS[i] for i in rng.integers(0, len(WORDS), size=n_words)]


def write_audiofolder(
    folder: Path,
    clips: list[Clip],
    *,
    metadata: str = "jsonl",
    text_column: str = "transcript",
    alignments: bool = False,
) -> Path:
    """Audio files + metadata.jsonl/.csv (`file_name`, the transcript, optionally MLS-style word times)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, clip in enumerate(clips):
        n_words = 2 + i % 4
        path = write_clip(folder, clip, n_words, seed=i)
        words = transcript(n_words, seed=i)
        row = {"file_name": path.name, text_column: " ".join(words)}
        if alignments:
            edges = np.linspace(0.05, clip.seconds - 0.05, n_words + 1).round(3).tolist()  # silence at both ends
            row |= {"tokenized": words, "aligned_token_start_time": edges[:-1], "aligned_token_end_time": edges[1:]}
        rows.append(row)
    if metadata == "jsonl":
        (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    else:
        if alignments:
            raise ValueError("word alignments are lists: write them as jsonl")
        with open(folder / "metadata.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return folder


def mixed_clips(n: int, prefix: str = "utt", seed: int = 0) -> list[Clip]:
    """`n` clips of 0.4-3 s over several rates, channel counts and formats."""
    rng = np.random.default_rng(seed)
    kinds = [(16000, 1, "wav"), (44100, 2, "flac"), (24000, 1, "mp3"), (8000, 1, "ogg"), (22050, 2, "wav")]
    clips = []
    for i in range(n):
        rate, channels, fmt = kinds[i % len(kinds)]
        clips.append(Clip(f"{prefix}{i:04d}", round(float(rng.uniform(0.4, 3.0)), 3), rate, channels, fmt))
    return clips


def word_tones(word: str) -> tuple[float, float]:
    """The two frequencies (Hz) that say `word` in `write_spoken_corpus`: fixed per word, far apart."""
    index = WORDS.index(word)
    return 200.0 + 230.0 * index, 3600.0 - 170.0 * index


def write_spoken_corpus(
    folder: Path, sizes: dict[str, int], *, seconds_per_word: float = 0.16, sampling_rate: int = 16000, seed: int = 0
) -> Path:
    """An audiofolder corpus a tiny model can learn to transcribe: each word of `WORDS` is its own pair of tones
    (`word_tones`), utterances of 2-4 words with a little noise, one `<split>/metadata.jsonl` per split of `sizes`."""
    rng = np.random.default_rng(seed)
    for split, n in sizes.items():
        out = Path(folder) / split
        out.mkdir(parents=True, exist_ok=True)
        rows = []
        for i in range(n):
            words = [WORDS[k] for k in rng.integers(0, len(WORDS), size=int(rng.integers(2, 5)))]
            length = round(seconds_per_word * sampling_rate)
            t = np.arange(length) / sampling_rate
            pieces = [
                0.3 * np.sin(2 * np.pi * f1 * t) + 0.2 * np.sin(2 * np.pi * f2 * t) for f1, f2 in map(word_tones, words)
            ]
            wave = np.concatenate(pieces) + 0.01 * rng.standard_normal(length * len(words))
            name = f"{split}-{i:05d}.wav"
            soundfile.write(out / name, wave.astype(np.float32), sampling_rate, subtype="PCM_16")
            rows.append({"file_name": name, "transcript": " ".join(words)})
        (out / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return Path(folder)
