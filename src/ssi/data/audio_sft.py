"""ASR examples from audio, for the continuous-features method (docs/features.md).

The same chat format and loss as ssi.data.sft (system? -> user: [instruction] <audio> -> assistant:
transcript, labels -100 on the prompt), read from every source `scripts/encode_audio.py` reads (hub id,
`save_to_disk` folder, data files, audiofolder) with the same decoding and resampling. The utterance's audio
is one non-text part of the user turn, written as `AUDIO_SLOT` positions, one per projector output: no token
marks it, because a base Llama has no speech tokens and the slots are filled with projected features, never
looked up; the chat header before and the end-of-turn after bound it. Every row's duration is known when the
split is built (ssi.data.durations: its header, read once per corpus and kept in a manifest), so an unreadable or
empty file is refused naming its id before training starts, and the durations batch the split by seconds
(ssi.train.sampler.SecondsBatchSampler).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX, Message

from ssi.data.sft import SFTOptions
from ssi.data.sources import DataValidationError
from ssi.encode.audio import AudioError, decode_audio
from ssi.encode.sources import AudioColumns, AudioSource
from ssi.model.speech_encoder import AudioSlots
from ssi.vocab.tiktoken import AUDIO_SLOT, SpeechLlama3Tokenizer


class AudioSFTDataset(torch.utils.data.Dataset):
    """Map-style ASR examples with audio: `{"tokens", "labels", "audio"}` for training; in inference mode
    `{"tokens", "audio", "id", "reference"}` where tokens end with the assistant header."""

    def __init__(
        self,
        source: AudioSource,
        rows: list[int],
        durations: list[float],
        tokenizer: SpeechLlama3Tokenizer,
        options: SFTOptions,
        slots: AudioSlots,
        inference: bool = False,
    ) -> None:
        if source.columns.text is None:
            raise DataValidationError(
                f"{source.name}: data.columns.transcript is needed (the answer and the reference)"
            )
        self.source, self.rows, self.durations = source, rows, durations
        self.tokenizer, self.options, self.slots = tokenizer, options, slots
        self.sampling_rate, self.inference = slots.sampling_rate, inference

    def set_epoch(self, epoch: int) -> None:
        """ASR examples are not random; present for the same interface as the other datasets."""

    def __len__(self) -> int:
        return len(self.rows)

    def messages(self, transcript: str) -> list[Message]:
        opts = self.options
        audio = {"type": "image", "content": None}  # torchtune's name for a non-text part: the audio slot
        user = [{"type": "text", "content": opts.instruction}, audio] if opts.instruction else [audio]
        masked = not opts.train_on_input
        messages = [Message("system", opts.system_prompt, masked=masked)] if opts.system_prompt else []
        messages.append(Message("user", user, masked=masked))
        messages.append(Message("assistant", "" if self.inference else transcript.strip(), masked=False))
        return messages

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.build(index).as_dict(self.inference)

    def build(self, index: int) -> AudioSFTExample:
        (row,) = self.source.rows([self.rows[int(index)]])
        where = f"{self.source.name}: sample {row.id!r}"
        try:
            wave = decode_audio(row.audio, self.sampling_rate)
        except AudioError as err:
            raise DataValidationError(f"{where}: {err}") from None
        n_slots = self.slots(len(wave))
        if n_slots < 1:
            raise DataValidationError(
                f"{where}: {len(wave) / self.sampling_rate:.3f} s is too short for one feature frame"
            )
        text = row.text or ""
        tokens, mask = self.tokenizer.tokenize_messages(self.messages(text), add_end_tokens=not self.inference)
        at = tokens.index(AUDIO_SLOT)
        tokens = tokens[:at] + [AUDIO_SLOT] * n_slots + tokens[at + 1 :]
        mask = mask[:at] + [True] * n_slots + mask[at + 1 :]
        limit = self.options.max_seq_len
        truncated = limit is not None and len(tokens) > limit
        if truncated and (self.inference or at + n_slots >= limit):
            raise DataValidationError(
                f"{where}: the prompt has {at + n_slots} positions ({n_slots} of audio, "
                f"{len(wave) / self.sampling_rate:.1f} s), no room under max_seq_len={limit}: "
                "raise data.sequence.max_seq_len"
            )
        if truncated:
            tokens, mask = tokens[:limit], mask[:limit]
        labels = [CROSS_ENTROPY_IGNORE_IDX if m else t for t, m in zip(tokens, mask, strict=True)]
        return AudioSFTExample(row.id, text, tokens, labels, wave, n_slots, truncated)


@dataclass
class AudioSFTExample:
    id: str
    reference: str
    tokens: list[int]  # AUDIO_SLOT where the projected features go
    labels: list[int]
    audio: np.ndarray  # mono float32 at the encoder's sampling rate
    n_slots: int
    truncated: bool

    def as_dict(self, inference: bool) -> dict[str, Any]:
        if inference:
            return {"tokens": self.tokens, "audio": self.audio, "id": self.id, "reference": self.reference}
        return {"tokens": self.tokens, "labels": self.labels, "audio": self.audio}


def audio_columns(columns: Mapping[str, Any]) -> AudioColumns:
    """The preset's `data.columns` as the audio reader names them (transcript is its `text`)."""
    return AudioColumns(
        audio=str(columns.get("audio", "audio")),
        text=None if columns.get("transcript") is None else str(columns["transcript"]),
        id=None if columns.get("id") is None else str(columns["id"]),
    )
