"""`data.dev.from_train=<fraction or count>`: a dev split held out of the train split, for a corpus that has
none (docs/data.md, "A corpus without a dev split").

The held-out utterances are chosen by a hash of their id, not by position or a seeded shuffle: the same ids
are held out whatever the row order, the number of ranks or the other settings, and an utterance never moves
between train and dev when rows are added. Rows that share an id go to the same side.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import datasets

from ssi.data.sources import DataValidationError

KEY = "data.dev.from_train"


@dataclass(frozen=True)
class HoldOut:
    """How much of train is held out: a fraction in (0, 1) of its distinct ids, or a count of them."""

    amount: float | int

    @classmethod
    def from_config(cls, value: Any) -> HoldOut | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise DataValidationError(f"{KEY} must be a fraction in (0, 1) or a count >= 1, got {value!r}")
        if isinstance(value, float) and value.is_integer() and value >= 1:
            value = int(value)
        if (isinstance(value, float) and not 0 < value < 1) or (isinstance(value, int) and value < 1):
            raise DataValidationError(f"{KEY} must be a fraction in (0, 1) or a count >= 1, got {value!r}")
        return cls(value)

    @property
    def label(self) -> str:
        """What the held-out split is called in result folders: it names exactly the data (`train_heldout_0.05`)."""
        return f"heldout_{self.amount}"

    def held_ids(self, ids: list[str], source: str) -> set[str]:
        distinct = sorted(set(ids), key=lambda i: hashlib.blake2b(i.encode("utf-8"), digest_size=8).digest())
        count = self.amount if isinstance(self.amount, int) else max(1, round(self.amount * len(distinct)))
        if count >= len(distinct):
            raise DataValidationError(
                f"{KEY}={self.amount}: {source} has {len(distinct)} distinct ids, so nothing would be left to train on"
            )
        return set(distinct[:count])

    def rows(self, ids: list[str], held_out: bool, source: str) -> list[int]:
        """The positions of the held-out ids (`held_out`), or of the ids that remain for training."""
        held = self.held_ids(ids, source)
        return [row for row, i in enumerate(ids) if (i in held) == held_out]

    def select(self, ds: datasets.Dataset, id_column: str, held_out: bool, source: str) -> datasets.Dataset:
        """The held-out rows of `ds` (`held_out`), or the rows that remain for training."""
        ids = [str(i) for i in ds.with_format("arrow")[id_column].to_pylist()]
        return ds.select(self.rows(ids, held_out, source))
