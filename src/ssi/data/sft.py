"""ASR instruction examples in the Llama 3 chat format, built with torchtune's message machinery.

system (optional) -> user: [instruction] <MM_SPEECH> DSUs <MM_TEXT> -> assistant: transcript.
The modality tokens (when the model has them) bracket the speech, so the answer itself is plain text.
`train_on_input=False` masks every prompt token; labels are -100 exactly where the mask is set.
In inference mode the prompt stops after the assistant header, with the sample id and reference
transcript attached, so generations can be matched back by id.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
import torch
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX, Message

from ssi.data.cpt import dedup_units
from ssi.data.sources import ColumnNames, DataValidationError
from ssi.vocab.layout import MODALITY_SPEECH, MODALITY_TEXT, dsus_to_text
from ssi.vocab.tiktoken import SpeechLlama3Tokenizer


@dataclass(frozen=True)
class SFTOptions:
    """How an ASR example is built (the `data.sft` section of a preset, plus shared sequence options)."""

    system_prompt: str | None = None
    instruction: str | None = None
    train_on_input: bool = False
    modality_tokens: bool = True
    dedup: bool = False
    max_seq_len: int | None = 2048


class SFTDataset(torch.utils.data.Dataset):
    """Map-style dataset of ASR examples: `{"tokens", "labels"}` for training; in inference mode
    `{"tokens", "id", "reference"}` where tokens end with the assistant header."""

    def __init__(
        self,
        ds: datasets.Dataset,
        tokenizer: SpeechLlama3Tokenizer,
        options: SFTOptions,
        columns: ColumnNames | None = None,
        inference: bool = False,
    ) -> None:
        if tokenizer.vocab is None:
            raise DataValidationError("the SFT dataset needs a speech-extended tokenizer (a model with ssi.json)")
        if options.modality_tokens and not tokenizer.vocab.modality_tokens:
            raise DataValidationError("modality_tokens=true but the model was extended without modality tokens")
        self.ds, self.tokenizer, self.options, self.inference = ds, tokenizer, options, inference
        self.columns = columns or ColumnNames()

    def set_epoch(self, epoch: int) -> None:
        """SFT examples are not random; present for the same interface as `CPTDataset`."""

    def __len__(self) -> int:
        return len(self.ds)

    def messages(self, row: dict[str, Any]) -> list[Message]:
        opts = self.options
        units = np.asarray(row[self.columns.speech], dtype=np.int64)
        speech = dsus_to_text((dedup_units(units) if opts.dedup else units).tolist())
        if opts.modality_tokens:
            speech = f"{MODALITY_SPEECH}{speech}{MODALITY_TEXT}"
        user = f"{opts.instruction.strip()}\n{speech}" if opts.instruction else speech
        masked = not opts.train_on_input
        messages = [Message("system", opts.system_prompt, masked=masked)] if opts.system_prompt else []
        messages.append(Message("user", user, masked=masked))
        answer = "" if self.inference else row[self.columns.transcript].strip()
        messages.append(Message("assistant", answer, masked=False))
        return messages

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.build(index).as_dict(self.inference)

    def build(self, index: int) -> SFTExample:
        """The example with its id, reference and whether it was truncated (for inspection and statistics)."""
        row = self.ds[int(index)]
        sample_id = str(row[self.columns.id])
        tokens, mask = self.tokenizer.tokenize_messages(self.messages(row), add_end_tokens=not self.inference)
        limit = self.options.max_seq_len
        truncated = limit is not None and len(tokens) > limit
        if truncated and self.inference:
            raise DataValidationError(
                f"sample {sample_id!r}: the prompt has {len(tokens)} tokens, more than max_seq_len={limit}; "
                "raise max_seq_len (a truncated prompt would lose the assistant header)"
            )
        if truncated:
            tokens, mask = tokens[:limit], mask[:limit]
        labels = [CROSS_ENTROPY_IGNORE_IDX if m else t for t, m in zip(tokens, mask, strict=True)]
        return SFTExample(sample_id, row[self.columns.transcript], tokens, labels, truncated)


@dataclass
class SFTExample:
    id: str
    reference: str
    tokens: list[int]
    labels: list[int]  # -100 exactly where torchtune's mask is set
    truncated: bool

    def as_dict(self, inference: bool) -> dict[str, Any]:
        if inference:
            return {"tokens": self.tokens, "id": self.id, "reference": self.reference}
        return {"tokens": self.tokens, "labels": self.labels}
