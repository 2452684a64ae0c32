"""The trained projector from speech-encoder features to LLM input embeddings (SLAM-ASR, 2402.08846).

Frame stacking joins every `downsample` consecutive feature frames into one vector (SLAM-ASR: 5, so
HuBERT's 50 Hz becomes 10 Hz), then a two-layer MLP (linear, ReLU, linear) maps it to the LLM's hidden
size. An utterance's last group, when shorter than `downsample`, is padded with zero frames rather than
dropped, so no audio at the end is lost: T frames give ceil(T / downsample) embeddings.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class FrameStackProjector(nn.Module):
    """(frames, `in_dim`) features -> (ceil(frames / downsample), `out_dim`) embeddings."""

    def __init__(self, in_dim: int, out_dim: int, downsample: int = 5, hidden: int = 2048) -> None:
        super().__init__()
        if downsample < 1 or hidden < 1:
            raise ValueError(f"projector.downsample and projector.hidden must be >= 1, got {downsample}, {hidden}")
        self.downsample = downsample
        self.in_dim = in_dim
        self.linear1 = nn.Linear(in_dim * downsample, hidden)
        self.linear2 = nn.Linear(hidden, out_dim)

    def n_outputs(self, n_frames: int) -> int:
        return math.ceil(n_frames / self.downsample)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """`features` [..., frames, in_dim] (one utterance, or a batch padded to a common length)."""
        frames = features.shape[-2]
        missing = self.n_outputs(frames) * self.downsample - frames
        stacked = F.pad(features, (0, 0, 0, missing)).reshape(
            *features.shape[:-2], self.n_outputs(frames), self.downsample * self.in_dim
        )
        return self.linear2(F.relu(self.linear1(stacked)))
