"""Plain-text evaluation data: the dev loss that shows whether training on speech erodes the base
model's text ability (`text_dev` in conf/training.yaml).

Each row's text is encoded as a base Llama 3 document (<|begin_of_text|> ... <|end_of_text|>), truncated
to `max_seq_len`, and scored on every next token.
"""

from __future__ import annotations

from typing import Any

from torch.utils.data import Dataset

from ssi.data.sources import DataValidationError, SourceSpec, load_rows
from ssi.vocab.tiktoken import SpeechLlama3Tokenizer


class TextDataset(Dataset):
    """`{"tokens", "labels"}` for each non-empty text of a source column."""

    def __init__(self, spec: SourceSpec, column: str, tokenizer: SpeechLlama3Tokenizer, max_seq_len: int) -> None:
        rows = load_rows(spec)
        if column not in rows.column_names:
            raise DataValidationError(
                f"text_dev source {spec.resolved!r}: no column {column!r}; available columns: {rows.column_names}"
            )
        self.texts = [t for t in rows[column] if isinstance(t, str) and t.strip()]
        if not self.texts:
            raise DataValidationError(f"text_dev source {spec.resolved!r}: column {column!r} has no non-empty text")
        self.tokenizer, self.max_seq_len = tokenizer, max_seq_len

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> dict[str, Any]:
        tokens = self.tokenizer.encode(self.texts[index], add_bos=True, add_eos=True)[: self.max_seq_len]
        return {"tokens": tokens, "labels": list(tokens)}
