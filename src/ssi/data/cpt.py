"""Continued pre-training (text completion) sequences built from word-aligned speech-text samples.

Sequence types (docs/data.md schema in, token ids out):

- `interleaved`: the words are cut into spans whose lengths come from `SpanSampler`; spans alternate
  between text (BPE of the words) and speech (the DSU frames those words cover), the first modality
  drawn at random;
- `concatenated_txt_dsu` / `concatenated_dsu_txt`: the whole transcript, then the whole utterance, or
  the reverse;
- `dsu_only` / `text_only`;
- a per-sample mixture of those types with weights.

Speech for words [a, b) is `speech[floor(start_a * fps) : ceil(end_{b-1} * fps)]`. Every random choice
comes from a generator seeded by (seed, epoch, index), so a sample is the same whichever worker, rank
or resume point builds it. DSU spans never go through BPE: their ids come from the vocabulary (`SpeechVocab.dsu_ids`).

The pieces a sequence is made of (`modality_token_ids`, `speech_token_ids`, `text_token_ids`,
`assemble`) are public: likelihood benchmarks (`ssi.eval.sequences`) build their prompts with them, so
a benchmark item reads like a training sequence of the run it evaluates.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import datasets
import numpy as np
import torch

from ssi.data.sources import ColumnNames, DataValidationError
from ssi.vocab.layout import SpeechVocab
from ssi.vocab.tiktoken import SpeechLlama3Tokenizer

SEQUENCE_TYPES = ("interleaved", "concatenated_txt_dsu", "concatenated_dsu_txt", "dsu_only", "text_only")
SPAN_DISTRIBUTIONS = ("poisson", "uniform", "binomial", "fixed")
# Alignment times are decimal seconds: 0.58 s * 50 Hz is 28.999999999999996 in binary floating point.
# Snap values this close to a frame boundary onto it before floor/ceil.
FRAME_EPS = 1e-6
WORD_CACHE_SIZE = 1 << 17


def time_to_frame(seconds: float, fps: float, rounding: Literal["floor", "ceil"]) -> int:
    """Frame index of a time, robust to decimal-to-binary error at frame boundaries."""
    x = seconds * fps
    return math.floor(x + FRAME_EPS) if rounding == "floor" else math.ceil(x - FRAME_EPS)


def speech_span(starts: np.ndarray, ends: np.ndarray, a: int, b: int, fps: float, n_frames: int) -> tuple[int, int]:
    """Frame range [lo, hi) of the speech covering words [a, b), clamped to the utterance."""
    lo = min(time_to_frame(float(starts[a]), fps, "floor"), n_frames)
    hi = min(time_to_frame(float(ends[b - 1]), fps, "ceil"), n_frames)
    return lo, max(lo, hi)


def dedup_units(units: np.ndarray) -> np.ndarray:
    """Collapse runs of a repeated unit to one (HuBERT-style deduplication)."""
    if units.size < 2:
        return units
    keep = np.empty(units.size, dtype=bool)
    keep[0] = True
    np.not_equal(units[1:], units[:-1], out=keep[1:])
    return units[keep]


Part = tuple[int | None, list[int] | np.ndarray]  # (modality token or None, the span's ids)


def modality_token_ids(vocab: SpeechVocab, enabled: bool) -> tuple[int | None, int | None]:
    """(`<extra_id_MM_TEXT>`, `<extra_id_MM_SPEECH>`) ids when `sequence.modality_tokens`, else (None, None)."""
    if not enabled:
        return None, None
    if not vocab.modality_tokens:
        raise DataValidationError("sequence.modality_tokens=true but the model was extended without modality tokens")
    return vocab.text_token_id, vocab.speech_token_id


def speech_token_ids(units: np.ndarray, vocab: SpeechVocab, dedup: bool) -> np.ndarray:
    """Token ids of one speech span: units (deduplicated when `sequence.dedup`) mapped into the DSU range."""
    return vocab.dsu_ids(dedup_units(units) if dedup else units)


def text_token_ids(tokenizer: SpeechLlama3Tokenizer, text: str, continuation: bool = False) -> list[int]:
    """BPE ids of one text span; a `continuation` of text already in the span starts with a space, as every
    word after the first does in an interleaved span."""
    return tokenizer.tt_model.encode((" " if continuation else "") + text.strip(), add_bos=False, add_eos=False)


def assemble(parts: list[Part], bos_id: int | None, eos_id: int | None) -> list[int]:
    """`[BOS] [modality] span [modality] span ... [EOS]`: the layout of every CPT sequence."""
    tokens = [bos_id] if bos_id is not None else []
    for modality, ids in parts:
        if modality is not None:
            tokens.append(modality)
        tokens.extend(ids.tolist() if isinstance(ids, np.ndarray) else ids)
    if eos_id is not None:
        tokens.append(eos_id)
    return tokens


@dataclass(frozen=True)
class SpanSampler:
    """Distribution of interleaved span lengths, in words (always >= 1).

    poisson: 1 + Poisson(mean - 1), so the mean is `mean`; uniform: integers in [low, high];
    binomial: max(1, Binomial(n, p)) (the reference project used n = 39 words, p = 0.1); fixed: `mean`.
    """

    distribution: str = "poisson"
    mean: float = 5.0
    low: int = 1
    high: int = 10
    n: int = 39
    p: float = 0.1

    def __post_init__(self) -> None:
        if self.distribution not in SPAN_DISTRIBUTIONS:
            raise DataValidationError(
                f"span.distribution must be one of {SPAN_DISTRIBUTIONS}, got {self.distribution!r}"
            )
        if self.distribution in ("poisson", "fixed") and self.mean < 1:
            raise DataValidationError(f"span.mean must be >= 1 word, got {self.mean}")
        if self.distribution == "uniform" and not 1 <= self.low <= self.high:
            raise DataValidationError(f"span.low/high must satisfy 1 <= low <= high, got {self.low}, {self.high}")
        if self.distribution == "binomial" and (self.n < 1 or not 0 < self.p <= 1):
            raise DataValidationError(f"span.n must be >= 1 and span.p in (0, 1], got {self.n}, {self.p}")

    def draw(self, rng: np.random.Generator, size: int) -> np.ndarray:
        """`size` span lengths (enough to cover `size` words whatever is drawn)."""
        if self.distribution == "poisson":
            return 1 + rng.poisson(self.mean - 1, size)
        if self.distribution == "uniform":
            return rng.integers(self.low, self.high + 1, size)
        if self.distribution == "binomial":
            return np.maximum(1, rng.binomial(self.n, self.p, size))
        return np.full(size, round(self.mean))

    def boundaries(self, rng: np.random.Generator, n_words: int) -> list[int]:
        """Cut points 0 = c0 < c1 < ... < ck = n_words."""
        cuts = np.cumsum(self.draw(rng, n_words))
        k = int(np.searchsorted(cuts, n_words))
        return [0, *cuts[:k].tolist(), n_words]


@dataclass(frozen=True)
class CPTOptions:
    """How a CPT sequence is built (the `data.sequence` section of a preset)."""

    sequence_type: str = "interleaved"
    mixture: dict[str, float] | None = None
    span: SpanSampler = field(default_factory=SpanSampler)
    dedup: bool = False
    modality_tokens: bool = True
    add_bos: bool = True
    add_eos: bool = True
    max_seq_len: int | None = 2048
    seed: int = 0

    def __post_init__(self) -> None:
        if self.sequence_type == "mixture":
            if not self.mixture:
                raise DataValidationError("sequence.type=mixture needs sequence.mixture: {type: weight, ...}")
            unknown = set(self.mixture) - set(SEQUENCE_TYPES)
            weights = list(self.mixture.values())
            if unknown or min(weights) < 0 or sum(weights) <= 0:
                raise DataValidationError(
                    f"sequence.mixture must map types in {SEQUENCE_TYPES} to non-negative weights with a "
                    f"positive sum, got {self.mixture}"
                )
        elif self.sequence_type not in SEQUENCE_TYPES:
            raise DataValidationError(
                f"sequence.type must be one of {(*SEQUENCE_TYPES, 'mixture')}, got {self.sequence_type!r}"
            )
        if self.max_seq_len is not None and self.max_seq_len < 2:
            raise DataValidationError(f"max_seq_len must be >= 2 or null, got {self.max_seq_len}")


@dataclass
class CPTSample:
    """One built sequence with what the inspection tool and statistics need to know about it."""

    id: str
    sequence_type: str
    tokens: list[int]
    n_frames: int  # speech frames covered before deduplication
    n_dsu_tokens: int  # DSU tokens emitted (after deduplication, before truncation)
    truncated: bool


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of one sample: a pure function of (seed, epoch, index)."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch, index])))


class _WordCache:
    """BPE ids of words, with and without a leading space; a span's ids are the concatenation.

    Equal to encoding the joined span because the Llama 3 pre-tokenizer splits before every space
    that precedes a word; the equivalence is covered by tests on real transcripts.
    """

    def __init__(self, tokenizer: SpeechLlama3Tokenizer, capacity: int = WORD_CACHE_SIZE) -> None:
        self._encode = tokenizer.tt_model.encode
        self._ids: dict[str, list[int]] = {}
        self._capacity = capacity

    def __call__(self, word: str) -> list[int]:
        ids = self._ids.get(word)
        if ids is None:
            if len(self._ids) >= self._capacity:
                self._ids.clear()
            ids = self._ids[word] = self._encode(word, add_bos=False, add_eos=False)
        return ids

    def span(self, words: list[str]) -> list[int]:
        if not words:
            return []
        ids = list(self(words[0]))
        for word in words[1:]:
            ids.extend(self(" " + word))
        return ids


class CPTDataset(torch.utils.data.Dataset):
    """Map-style dataset of CPT sequences: `{"tokens", "labels"}` (labels = tokens, not shifted)."""

    def __init__(
        self,
        ds: datasets.Dataset,
        tokenizer: SpeechLlama3Tokenizer,
        fps: float,
        options: CPTOptions,
        columns: ColumnNames | None = None,
    ) -> None:
        if tokenizer.vocab is None:
            raise DataValidationError("the CPT dataset needs a speech-extended tokenizer (a model with ssi.json)")
        self.vocab: SpeechVocab = tokenizer.vocab
        self._text_id, self._speech_id = modality_token_ids(self.vocab, options.modality_tokens)
        self.ds, self.tokenizer, self.fps, self.options = ds, tokenizer, fps, options
        self.columns = columns or ColumnNames()
        self.epoch = 0
        self._words = _WordCache(tokenizer)
        if options.sequence_type == "mixture":
            assert options.mixture is not None
            self._types = list(options.mixture)
            weights = np.asarray(list(options.mixture.values()), dtype=np.float64)
            self._probs = weights / weights.sum()
        else:
            self._types, self._probs = [options.sequence_type], np.ones(1)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's random draws (span lengths, first modality, mixture type)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, index: int) -> dict[str, Any]:
        tokens = self.build(index).tokens
        return {"tokens": tokens, "labels": list(tokens)}

    def build(self, index: int) -> CPTSample:
        row = self.ds[int(index)]
        cols = self.columns
        rng = sample_rng(self.options.seed, self.epoch, int(index))
        kind = self._types[0]
        if len(self._types) > 1:
            kind = self._types[int(rng.choice(len(self._types), p=self._probs))]
        speech = np.asarray(row[cols.speech], dtype=np.int64)
        parts: list[Part] = []
        if kind == "interleaved":
            parts, n_frames = self._interleaved(row, speech, rng)
        else:
            text = text_token_ids(self.tokenizer, row[cols.transcript])
            n_frames = speech.size
            dsus = speech_token_ids(speech, self.vocab, self.options.dedup)
            order = {
                "concatenated_txt_dsu": [(self._text_id, text), (self._speech_id, dsus)],
                "concatenated_dsu_txt": [(self._speech_id, dsus), (self._text_id, text)],
                "dsu_only": [(self._speech_id, dsus)],
                "text_only": [(self._text_id, text)],
            }
            parts = order[kind]
        tokens = assemble(
            parts,
            self.tokenizer.bos_id if self.options.add_bos else None,
            self.tokenizer.eos_id if self.options.add_eos else None,
        )
        n_dsu = sum(ids.size for _, ids in parts if isinstance(ids, np.ndarray))
        limit = self.options.max_seq_len
        truncated = limit is not None and len(tokens) > limit
        if truncated:
            tokens = tokens[:limit]
        return CPTSample(str(row[cols.id]), kind, tokens, n_frames, n_dsu, truncated)

    def _interleaved(self, row: dict[str, Any], speech: np.ndarray, rng: np.random.Generator) -> tuple[list[Part], int]:
        cols = self.columns
        words: list[str] = row[cols.words]
        starts, ends = row[cols.start], row[cols.end]
        cuts = self.options.span.boundaries(rng, len(words))
        is_speech = bool(rng.integers(2))
        parts: list[Part] = []
        n_frames = 0
        for a, b in itertools.pairwise(cuts):
            if is_speech:
                lo, hi = speech_span(starts, ends, a, b, self.fps, speech.size)
                n_frames += hi - lo
                parts.append((self._speech_id, speech_token_ids(speech[lo:hi], self.vocab, self.options.dedup)))
            else:
                parts.append((self._text_id, self._words.span(words[a:b])))
            is_speech = not is_speech
        return parts, n_frames
