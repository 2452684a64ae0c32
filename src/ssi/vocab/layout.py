"""The token-ID layout shared by every tool (docs/vocabulary.md) and the manifest that records it.

An extended vocabulary is, in id order::

    0 .. B-1                 base BPE ranks (B = number of ranks in original/tokenizer.model)
    B .. B+S-1               the base's S special tokens (S = 256 in every Llama 3 release), named as
                             the base's own files name them (ssi.vocab.specials)
    B+S .. B+S+N-1           DSU i, written in text as chr(0xF0000 + i)
    B+S+N, B+S+N+1           <extra_id_MM_TEXT>, <extra_id_MM_SPEECH> (optional)

`SpeechVocab` is that layout for one model; it is stored as `ssi.json` in every model directory so
that no tool needs `n_dsus` or a special-token table repeated by hand. It is the one owner of DSU id
arithmetic: every conversion between units, their characters and their token ids goes through it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ssi.files import FileFormatError, read_json, write_json
from ssi.hf_dir import MANIFEST_NAME
from ssi.vocab import specials

DSU_CHAR_OFFSET = 0xF0000  # Supplementary Private Use Area-A
MAX_DSUS = 65534  # U+F0000 .. U+FFFFD (U+FFFFE/U+FFFFF are noncharacters)
MODALITY_TEXT = "<extra_id_MM_TEXT>"
MODALITY_SPEECH = "<extra_id_MM_SPEECH>"
N_LLAMA3_SPECIAL = 256  # special tokens of every Llama 3 release, for layouts built without a table (tests)
MANIFEST_FORMAT = 2  # 2 records the base's special-token table; 1 (earlier ssi) is read from tokenizer.json


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


@dataclass(frozen=True)
class SpeechVocab:
    """The extended vocabulary of one model: where DSUs and modality tokens live, and its special tokens.

    `special_tokens` is the base's own name -> id table (`ssi.vocab.specials`); without it (a layout built
    by hand, e.g. in tests) only id ranges are known, assuming the 256 specials of every Llama 3 release."""

    n_bpe: int
    n_dsus: int
    modality_tokens: bool = True
    base_model: str | None = None
    dsu_encoder: str | None = None
    frame_rate: float | None = None
    special_tokens: Mapping[str, int] | None = None

    def __post_init__(self) -> None:
        if self.n_bpe <= 0:
            raise VocabError(f"n_bpe must be positive, got {self.n_bpe}")
        if not 0 < self.n_dsus <= MAX_DSUS:
            raise VocabError(f"n_dsus must be in [1, {MAX_DSUS}], got {self.n_dsus}")
        if self.special_tokens is not None:
            try:
                table = specials.check_block(self.special_tokens, self.n_bpe, "special_tokens")
            except specials.SpecialTokenError as err:
                raise VocabError(str(err)) from None
            object.__setattr__(self, "special_tokens", table)

    # --- id ranges -------------------------------------------------------------------------
    @property
    def n_special(self) -> int:
        return len(self.special_tokens) if self.special_tokens is not None else N_LLAMA3_SPECIAL

    @property
    def base_vocab_size(self) -> int:
        """Size of the unextended vocabulary: BPE ranks plus the special tokens."""
        return self.n_bpe + self.n_special

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
    def n_appended(self) -> int:
        """Tokens appended after the base vocabulary (DSUs, then modality tokens): independent of the
        special-token table, so a layout built without it already knows how many rows extension adds."""
        return self.vocab_size - self.base_vocab_size

    def special_id(self, name: str) -> int:
        """The id of a special token by name (`<|end_of_text|>`...), as the base's files named it."""
        table = self._table()
        if name not in table:
            raise VocabError(f"this vocabulary has no special token {name} (base {self.base_model})")
        return table[name]

    @property
    def stop_token_ids(self) -> list[int]:
        """Generation stops on these: `<|end_of_text|>`, `<|eot_id|>`, `<|eom_id|>` where the base has them."""
        table = self._table()
        return [table[name] for name in specials.stop_names(table)]

    @property
    def pad_token_id(self) -> int:
        return self._table()[specials.pad_name(self._table())]

    def _table(self) -> Mapping[str, int]:
        if self.special_tokens is None:
            raise VocabError("this vocabulary was built without the base's special-token table")
        return self.special_tokens

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
            "special": [self.n_bpe, self.base_vocab_size],
            "dsu": [self.dsu_start, self.dsu_end],
        }
        table = self._table()
        return {
            "format_version": MANIFEST_FORMAT,
            **asdict(self),
            "special_tokens": dict(table),
            "stop_tokens": specials.stop_names(table),
            "pad_token": specials.pad_name(table),
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
    def from_manifest(
        cls, data: dict[str, Any], source: str = MANIFEST_NAME, special_tokens: Mapping[str, int] | None = None
    ) -> SpeechVocab:
        """The vocabulary an `ssi.json` describes; a format-1 manifest (no special-token table) needs the
        table from elsewhere (`load` reads it from the directory's tokenizer.json)."""
        version = data.get("format_version")
        if version not in (1, MANIFEST_FORMAT):
            raise VocabError(f"{source}: unsupported format_version {version!r}")
        missing = [k for k in ("n_bpe", "n_dsus", "modality_tokens") if k not in data]
        if missing:
            raise VocabError(f"{source}: missing keys {missing}")
        fields = {k: data.get(k) for k in cls.__dataclass_fields__}
        if version == 1:
            fields["special_tokens"] = special_tokens
        elif not isinstance(fields["special_tokens"], dict):
            raise VocabError(f"{source}: format_version 2 needs the special_tokens table (name -> id)")
        vocab = cls(**fields)
        if data.get("vocab_size", vocab.vocab_size) != vocab.vocab_size:
            raise VocabError(
                f"{source}: vocab_size {data['vocab_size']} does not match the layout "
                f"({vocab.n_bpe} BPE + {vocab.n_special} special + {vocab.n_dsus} DSUs"
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
            data = read_json(path)
            table = None
            if data.get("format_version") == 1 and isinstance(data.get("n_bpe"), int):
                limit = data["n_bpe"] + N_LLAMA3_SPECIAL  # format 1 always had 256 specials before the DSUs
                table = specials.read_special_tokens(model_dir, data["n_bpe"], limit=limit)
            vocab = cls.from_manifest(data, source=str(path), special_tokens=table)
            config_path = model_dir / "config.json"
            config_vocab = read_json(config_path).get("vocab_size") if check_config else vocab.vocab_size
        except (FileFormatError, specials.SpecialTokenError) as err:
            raise VocabError(str(err)) from None
        if config_vocab != vocab.vocab_size:
            raise VocabError(
                f"{config_path}: vocab_size {config_vocab} disagrees with {path} "
                f"(vocab_size {vocab.vocab_size}, n_dsus {vocab.n_dsus}); the directory is inconsistent"
            )
        return vocab
