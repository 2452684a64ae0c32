"""What a training step achieved: tokens/s, and model FLOPs utilisation (MFU), the share of the
accelerator's peak that training turns into model math; and what it trained on, counted three ways that mean
the same for both methods: text tokens, speech positions and seconds of audio (`AudioClock`).

FLOPs per trained token follow the PaLM paper's accounting (Chowdhery et al. 2022, appendix B):
`6 * N + 12 * L * d * T`, where N counts the weights that take part in matrix multiplications
(attention and MLP projections of every layer, plus the output projection; the embedding lookup is
free), L is the number of layers, d the hidden size and T the attention span (the batch's padded
or packed sequence length). Causal masking and recomputation (activation checkpointing) are not
discounted or added: MFU measures useful model math, not what the kernels executed.

The peak is the dense bf16 tensor-core figure of the device's data sheet (`PEAK_BF16_TFLOPS`), or
`peak_tflops` from the config for anything not in the table. docs/training.md lists both.
"""

from __future__ import annotations

import resource
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ssi.data.audio_sft import AudioSFTDataset
from ssi.data.config import BuiltSplit
from ssi.model.architecture import LlamaArchitecture

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, in TFLOP/s. Matched against
# torch.cuda.get_device_name() in this order, so the more specific names come first.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("GB200", 2500.0),
    ("B200", 2250.0),
    ("H200", 989.4),
    ("GH200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),
    ("H800", 989.4),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("A40", 149.7),
    ("A6000", 154.8),
    ("L4", 121.0),
    ("A10", 125.0),
)


def matmul_params(
    num_layers: int, embed_dim: int, num_heads: int, num_kv_heads: int, intermediate_dim: int, vocab_size: int
) -> int:
    """Weights used in matrix multiplications per token: q/k/v/o and the SwiGLU MLP per layer, and the output."""
    head_dim = embed_dim // num_heads
    attention = 2 * embed_dim * embed_dim + 2 * embed_dim * num_kv_heads * head_dim
    mlp = 3 * embed_dim * intermediate_dim
    return num_layers * (attention + mlp) + vocab_size * embed_dim


def training_flops_per_token(n_matmul_params: int, num_layers: int, embed_dim: int, seq_len: int) -> float:
    """Forward + backward FLOPs of one token in a sequence of `seq_len` (PaLM's 6N + 12 L d T)."""
    return 6.0 * n_matmul_params + 12.0 * num_layers * embed_dim * seq_len


def real_positions(counts: Mapping[str, float]) -> float:
    """The positions of a batch's counts that are not padding: text, DSU, special tokens and audio slots."""
    return counts["text"] + counts["dsu"] + counts["special"] + counts.get("audio", 0)


def speech_positions(counts: Mapping[str, float]) -> float:
    """The positions that carry speech: unit tokens (method=units) and audio slots (method=features)."""
    return counts["dsu"] + counts.get("audio", 0)


@dataclass(frozen=True)
class AudioClock:
    """Seconds of audio behind a batch's speech positions, so that runs of either method (or of encoders with
    other frame rates) can be compared at equal audio: unit tokens at the frame rate their encoder recorded
    (encoding.json, else the preset's encoder), waveform samples at the rate they were decoded to. Padding never
    counts (collated waveforms are unpadded; units are counted on real positions). Deduplicated units measure
    nothing: a token then stands for a run of frames whose length the batch no longer holds, and no figure is
    better than a wrong one."""

    frame_rate: float | None = None  # unit tokens per second
    sampling_rate: int | None = None  # waveform samples per second

    @classmethod
    def of_split(cls, built: BuiltSplit) -> AudioClock:
        dataset = built.dataset
        if isinstance(dataset, AudioSFTDataset):
            return cls(sampling_rate=dataset.sampling_rate)
        assert built.encoder is not None  # a units split is built from its encoder
        return cls(frame_rate=None if dataset.options.dedup else built.encoder.fps)

    @property
    def measures(self) -> bool:
        return self.frame_rate is not None or self.sampling_rate is not None

    def seconds(self, batch: Mapping[str, Any]) -> float:
        """Audio seconds of one collated batch."""
        seconds = 0.0
        if self.frame_rate is not None:
            seconds += int(batch["token_counts"]["dsu"]) / self.frame_rate
        if self.sampling_rate is not None:
            seconds += sum(len(wave) for wave in batch.get("audio", ())) / self.sampling_rate
        return seconds


def peak_flops(device: torch.device, peak_tflops: float | None = None) -> float | None:
    """Peak FLOP/s of one device: `peak_tflops` when given, else the data-sheet bf16 figure of a known
    GPU; None when unknown (MFU is then not logged)."""
    if peak_tflops is not None:
        return float(peak_tflops) * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops * 1e12
    return None


@dataclass(frozen=True)
class Throughput:
    """Turns one optimizer step's counts (summed over ranks) into the logged throughput metrics."""

    n_matmul_params: int
    num_layers: int
    embed_dim: int
    device: torch.device
    peak: float | None  # FLOP/s of one device, None when unknown

    @classmethod
    def for_model(cls, arch: LlamaArchitecture, device: torch.device, peak_tflops: float | None) -> Throughput:
        n = matmul_params(
            arch.num_layers, arch.embed_dim, arch.num_heads, arch.num_kv_heads, arch.intermediate_dim, arch.vocab_size
        )
        return cls(n, arch.num_layers, arch.embed_dim, device, peak_flops(device, peak_tflops))

    def batch_flops(self, real_tokens: int, seq_len: int) -> float:
        """Model FLOPs of training on a batch with `real_tokens` non-padding tokens of length `seq_len`."""
        return real_tokens * training_flops_per_token(self.n_matmul_params, self.num_layers, self.embed_dim, seq_len)

    def metrics(self, counts: dict[str, float], elapsed: float, world_size: int) -> dict[str, float]:
        """tokens/s, samples/s, token counts by kind and speech positions, model TFLOP/s per device, MFU and peak
        memory."""
        real_tokens = real_positions(counts)
        per_device_flops = counts["model_flops"] / elapsed / world_size
        metrics = {
            "tokens_per_second": real_tokens / elapsed,
            "samples_per_second": counts["samples"] / elapsed,
            "text_tokens": int(counts["text"]),
            "dsu_tokens": int(counts["dsu"]),
            "special_tokens": int(counts["special"]),
            "audio_positions": int(counts.get("audio", 0)),  # the features method's projected frames
            "speech_positions": int(speech_positions(counts)),
            "padding_tokens": int(counts["padding"]),
            "model_tflops_per_device": per_device_flops / 1e12,
        }
        if self.peak is not None:
            metrics["mfu"] = per_device_flops / self.peak
        if self.device.type == "cuda":
            metrics["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        else:
            metrics["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        return metrics
