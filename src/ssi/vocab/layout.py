"""The token-ID layout shared by every tool (docs/vocabulary.md) and the manifest that records it.

An extended vocabulary is, in id order::

    0 .. B-1                 base BPE ranks (B = number of ranks in original/tokenizer.model)
    B .. B+255               the 256 Llama 3 special tokens
    B+256 .. B+256+N-1       DSU i, written in text as chr(0xF0000 + i)
    B+256+N, B+256+N+1       <extra_id_MM_TEXT>, <extra_id_MM_SPEECH> (optional)

`SpeechVocab` is that layout for one model; it is stored as `ssi.json` in every model directory so
that no tool needs `n_dsus` repeated by hand. It is the one owner of DSU id arithmetic: every conversion
between units, their characters and their token ids goes through it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ssi.files import FileFormatError, read_json, write_json
from ssi.hf_dir import MANIFEST_NAME

DSU_CHAR_OFFSET = 0xF0000  # Supplementary Private Use Area-A
MAX_DSUS = 65534  # U+F0000 .. U+FFFFD (U+FFFFE/U+FFFFF are noncharacters)
MODALITY_TEXT = "<extra_id_MM_TEXT>"
MODALITY_SPEECH = "<extra_id_MM_SPEECH>"
N_LLAMA3_SPECIAL = 256
MANIFEST_FORMAT = 1


class VocabError(ValueError):
    """A token id, DSU or manifest that does not fit the layout."""


def dsu_to_char(unit: int) -> str:
    """The text character of DSU `unit`; out-of-range units are an error, never a wrap-around."""
    if not 0 <= unit < MAX_DSUS:
        raise VocabError(f"DSU {unit} is outside [0, {MAX_DSUS}): it has no Private Use Area character")
    return chr(DSU_CHAR_OFFSET + unit)


def char_to_dsu(char: str) -> int:
    """The DSU index of a Private Use Area character (inverse of `dsu_to_char`)."""
    if len(char) != 1 or not is_dsu_char(char):
        raise VocabError(f"{char!r} is not a DSU character (U+F0000..U+FFFFD)")
    return ord(char) - DSU_CHAR_OFFSET


def is_dsu_char(char: str) -> bool:
    return 0 <= ord(char) - DSU_CHAR_OFFSET < MAX_DSUS


def dsus_to_text(units: Iterable[int]) -> str:
    """A DSU sequence as a string of one character per unit."""
    return "".join(dsu_to_char(int(u)) for u in units)


def text_to_dsus(text: str) -> list[int]:
    return [char_to_dsu(c) for c in text]


def count_bpe_ranks(path: str | Path) -> int:
    """Number of ranks in a tiktoken BPE file (B in the id layout)."""
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def llama3_special_tokens(n_bpe: int) -> dict[str, int]:
    """The 256 Llama 3.1/3.2 special tokens, numbered from the size of the BPE file.

    Names and order follow the tokenizer.json of the published Llama 3.2 checkpoints, so the
    tiktoken path and the HF path agree on every special id.
    """
    named = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>",
        "<|finetune_right_pad_id|>",
        "<|reserved_special_token_2|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eom_id|>",
        "<|eot_id|>",
        "<|python_tag|>",
    ]
    reserved = [f"<|reserved_special_token_{3 + k}|>" for k in range(N_LLAMA3_SPECIAL - len(named))]
    return {name: n_bpe + offset for offset, name in enumerate(named + reserved)}


@dataclass(frozen=True)
class SpeechVocab:
    """The extended vocabulary of one model: where DSUs and modality tokens live."""

    n_bpe: int
    n_dsus: int
    modality_tokens: bool = True
    base_model: str | None = None
    dsu_encoder: str | None = None
    frame_rate: float | None = None

    def __post_init__(self) -> None:
        if self.n_bpe <= 0:
            raise VocabError(f"n_bpe must be positive, got {self.n_bpe}")
        if not 0 < self.n_dsus <= MAX_DSUS:
            raise VocabError(f"n_dsus must be in [1, {MAX_DSUS}], got {self.n_dsus}")

    # --- id ranges -------------------------------------------------------------------------
    @property
    def base_vocab_size(self) -> int:
        """Size of the unextended vocabulary: BPE ranks plus the Llama 3 special tokens."""
        return self.n_bpe + N_LLAMA3_SPECIAL

    @property
    def dsu_start(self) -> int:
        return self.base_vocab_size

    @property
    def dsu_end(self) -> int:
        """One past the last DSU id."""
        return self.dsu_start + self.n_dsus

    @property
    def text_token_id(self) -> int | None:
        return self.dsu_end if self.modality_tokens else None

    @property
    def speech_token_id(self) -> int | None:
        return self.dsu_end + 1 if self.modality_tokens else None

    @property
    def vocab_size(self) -> int:
        return self.dsu_end + (2 if self.modality_tokens else 0)

    @property
    def special_tokens(self) -> dict[str, int]:
        return llama3_special_tokens(self.n_bpe)

    @property
    def modality_token_ids(self) -> dict[str, int]:
        if not self.modality_tokens:
            return {}
        return {MODALITY_TEXT: self.dsu_end, MODALITY_SPEECH: self.dsu_end + 1}

    def dsu_id(self, unit: int) -> int:
        self.check_units([unit])
        return self.dsu_start + unit

    def dsu_ids(self, units: Sequence[int] | np.ndarray) -> list[int] | np.ndarray:
        """Token ids of a DSU sequence, computed directly (DSU spans never need BPE): a list for a list,
        an int64 array for a numpy array."""
        self.check_units(units)
        if isinstance(units, np.ndarray):
            return units.astype(np.int64, copy=False) + self.dsu_start
        start = self.dsu_start
        return [start + int(u) for u in units]

    def check_units(self, units: Sequence[int] | np.ndarray, where: str = "") -> None:
        """Raise if any unit lies outside [0, n_dsus); `where` names the sample in the message."""
        if len(units) == 0:
            return
        low, high = (int(units.min()), int(units.max())) if isinstance(units, np.ndarray) else (min(units), max(units))
        if low < 0 or high >= self.n_dsus:
            bad = low if low < 0 else high
            at = f" in {where}" if where else ""
            raise VocabError(f"DSU id {bad}{at} is outside [0, {self.n_dsus}) (n_dsus from the model manifest)")

    def is_dsu_id(self, token_id: int) -> bool:
        return self.dsu_start <= token_id < self.dsu_end

    def unit_of(self, token_id: int) -> int:
        """The DSU index of a DSU token id (inverse of `dsu_id`)."""
        if not self.is_dsu_id(token_id):
            raise VocabError(f"token id {token_id} is not a DSU id [{self.dsu_start}, {self.dsu_end})")
        return token_id - self.dsu_start

    def dsu_ids_of_text(self, run: str, position: int = 0) -> list[int]:
        """Token ids of a run of DSU characters; `position` (of the run in its text) locates a bad one."""
        ids = [ord(c) - DSU_CHAR_OFFSET + self.dsu_start for c in run]
        if ids and (min(ids) < self.dsu_start or max(ids) >= self.dsu_end):
            bad = next(i for i, t in enumerate(ids) if not self.is_dsu_id(t))
            unit = ord(run[bad]) - DSU_CHAR_OFFSET
            raise VocabError(
                f"DSU character U+{ord(run[bad]):X} (unit {unit}) at text position {position + bad} is outside "
                f"this model's {self.n_dsus} DSUs"
            )
        return ids

    def kind_of(self, token_id: int) -> str:
        """`text` (a BPE rank), `dsu`, or `special` (Llama 3 special and modality tokens)."""
        if token_id < self.n_bpe:
            return "text"
        return "dsu" if self.is_dsu_id(token_id) else "special"

    # --- manifest --------------------------------------------------------------------------
    def to_manifest(self) -> dict[str, Any]:
        ranges = {
            "bpe": [0, self.n_bpe],
            "llama3_special": [self.n_bpe, self.base_vocab_size],
            "dsu": [self.dsu_start, self.dsu_end],
        }
        return {
            "format_version": MANIFEST_FORMAT,
            **asdict(self),
            "dsu_char_offset": DSU_CHAR_OFFSET,
            "id_ranges": ranges,
            "modality_token_ids": self.modality_token_ids,
            "vocab_size": self.vocab_size,
        }

    def save(self, model_dir: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Write `ssi.json`; `extra` adds provenance (e.g. how new rows were initialised)."""
        path = Path(model_dir) / MANIFEST_NAME
        write_json(path, {**self.to_manifest(), **(extra or {})})
        return path

    @classmethod
    def from_manifest(cls, data: dict[str, Any], source: str = MANIFEST_NAME) -> SpeechVocab:
        if data.get("format_version") != MANIFEST_FORMAT:
            raise VocabError(f"{source}: unsupported format_version {data.get('format_version')!r}")
        missing = [k for k in ("n_bpe", "n_dsus", "modality_tokens") if k not in data]
        if missing:
            raise VocabError(f"{source}: missing keys {missing}")
        fields = {k: data.get(k) for k in cls.__dataclass_fields__}
        vocab = cls(**fields)
        if data.get("vocab_size", vocab.vocab_size) != vocab.vocab_size:
            raise VocabError(
                f"{source}: vocab_size {data['vocab_size']} does not match the layout "
                f"({vocab.n_bpe} BPE + 256 special + {vocab.n_dsus} DSUs"
                f"{' + 2 modality tokens' if vocab.modality_tokens else ''} = {vocab.vocab_size})"
            )
        return vocab

    @classmethod
    def load(cls, model_dir: str | Path, check_config: bool = True) -> SpeechVocab:
        """Read `ssi.json` from a model directory and, by default, check it against config.json."""
        model_dir = Path(model_dir)
        path = model_dir / MANIFEST_NAME
        if not path.is_file():
            raise VocabError(
                f"{path} not found: {model_dir} is not a speech-extended model "
                "(create one with scripts/extend_llama3_2.py)"
            )
        try:
            vocab = cls.from_manifest(read_json(path), source=str(path))
            config_path = model_dir / "config.json"
            config_vocab = read_json(config_path).get("vocab_size") if check_config else vocab.vocab_size
        except FileFormatError as err:
            raise VocabError(str(err)) from None
        if config_vocab != vocab.vocab_size:
            raise VocabError(
                f"{config_path}: vocab_size {config_vocab} disagrees with {path} "
                f"(vocab_size {vocab.vocab_size}, n_dsus {vocab.n_dsus}); the directory is inconsistent"
            )
        return vocab
