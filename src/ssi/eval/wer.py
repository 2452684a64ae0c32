"""Word error rate: normalise both sides, align words, count substitutions, deletions and insertions.

Normalisation (whisper-normalizer) costs most of the time, so each distinct string is normalised once,
over several processes for large sets. Alignment uses the Levenshtein engine jiwer itself uses
(rapidfuzz) on interned word ids, which gives jiwer's counts a few times faster (tests check them
against jiwer). Corpus WER = (S + D + I) / (S + D + H), as jiwer's.
"""

from __future__ import annotations

import concurrent.futures
import functools
import math
import multiprocessing
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rapidfuzz.distance import Levenshtein
from tqdm import tqdm

NORMALIZERS = ("whisper", "basic", "none")
# Below this many distinct strings, starting worker processes costs more than it saves.
_PARALLEL_MIN_STRINGS = 5000
_PARALLEL_CHUNK = 500


class WerInputError(ValueError):
    """Generations or references that cannot be scored as given; the message names the file, line or id."""


def _identity(text: str) -> str:
    return text


@functools.cache
def get_normalizer(name: str) -> Callable[[str], str]:
    """whisper = whisper-normalizer's EnglishTextNormalizer, basic = its BasicTextNormalizer, none = as is."""
    if name == "whisper":
        from whisper_normalizer.english import EnglishTextNormalizer

        return EnglishTextNormalizer()
    if name == "basic":
        from whisper_normalizer.basic import BasicTextNormalizer

        return BasicTextNormalizer()
    if name == "none":
        return _identity
    raise ValueError(f"unknown normalizer {name!r}; expected one of {NORMALIZERS}")


def _normalize_chunk(name: str, texts: list[str]) -> list[str]:
    normalize = get_normalizer(name)
    return [normalize(t) for t in texts]


def default_workers() -> int:
    """CPUs this process may use (respects Slurm/taskset binding), at most 16 so a shared node is not flooded."""
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(available, 16))


def normalize_texts(
    texts: Sequence[str], normalizer: str = "whisper", *, workers: int | None = None, progress: bool = True
) -> list[str]:
    """Normalise each distinct string once (references and good hypotheses repeat); returns one per input.

    Whisper's English normaliser costs ~0.25 ms a string, so large sets are spread over `workers`
    processes (spawned, not forked: the caller may hold vLLM/torch threads).
    """
    get_normalizer(normalizer)  # fail on an unknown name before any work
    if normalizer == "none":
        return list(texts)
    unique = list(dict.fromkeys(texts))
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    chunks = [unique[i : i + _PARALLEL_CHUNK] for i in range(0, len(unique), _PARALLEL_CHUNK)]
    bar = tqdm(total=len(unique), unit="str", desc=f"normalising ({normalizer})", disable=not progress)
    normalized: list[str] = []
    with bar:
        if workers == 1 or len(unique) < _PARALLEL_MIN_STRINGS:
            for chunk in chunks:
                normalized.extend(_normalize_chunk(normalizer, chunk))
                bar.update(len(chunk))
        else:
            context = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
                for chunk, out in zip(
                    chunks, pool.map(_normalize_chunk, [normalizer] * len(chunks), chunks), strict=True
                ):
                    normalized.extend(out)
                    bar.update(len(chunk))
    mapping = dict(zip(unique, normalized, strict=True))
    return [mapping[t] for t in texts]


@dataclass(frozen=True, slots=True)
class UtteranceErrors:
    """Edit counts of one utterance; `reference`/`hypothesis` are the normalised texts whose words were aligned."""

    id: str
    substitutions: int
    deletions: int
    insertions: int
    hits: int
    reference: str
    hypothesis: str

    @property
    def errors(self) -> int:
        return self.substitutions + self.deletions + self.insertions

    @property
    def reference_words(self) -> int:
        return self.substitutions + self.deletions + self.hits

    @property
    def wer(self) -> float:
        """errors / reference words; inf for insertions against an empty (normalised) reference."""
        if self.reference_words == 0:
            return math.inf if self.errors else 0.0
        return self.errors / self.reference_words


@dataclass(frozen=True)
class WerResult:
    """Corpus totals and per-utterance counts in input order."""

    wer: float
    substitutions: int
    deletions: int
    insertions: int
    hits: int
    utterances: list[UtteranceErrors]

    @property
    def reference_words(self) -> int:
        return self.substitutions + self.deletions + self.hits

    @property
    def hypothesis_words(self) -> int:
        return self.substitutions + self.insertions + self.hits


class _WordIds(dict):
    """Interns words as consecutive ints, shared by references and hypotheses (the encoding jiwer uses)."""

    def __missing__(self, word: str) -> int:
        self[word] = index = len(self)
        return index


def align_counts(reference: list[int], hypothesis: list[int]) -> tuple[int, int, int]:
    """(substitutions, deletions, insertions) of the alignment jiwer reports for these word sequences.

    jiwer 4 maps words to ints and reads the edit blocks of `rapidfuzz.distance.Levenshtein.opcodes`;
    those blocks are built from `Levenshtein.editops`, so counting the edit operations of the same int
    sequences gives jiwer's split of the distance into S/D/I (tests check this against jiwer itself)
    without jiwer's per-word Python objects, which cost most of its time at 100k utterances.
    """
    if reference == hypothesis:
        return 0, 0, 0
    tags = [op[0] for op in Levenshtein.editops(reference, hypothesis).as_list()]
    deletions, insertions = tags.count("delete"), tags.count("insert")
    return len(tags) - deletions - insertions, deletions, insertions


def compute_wer(
    ids: Sequence[str],
    references: Sequence[str],
    hypotheses: Sequence[str],
    *,
    normalizer: str = "whisper",
    workers: int | None = None,
    progress: bool = True,
) -> WerResult:
    """Normalise, split on whitespace, align each pair; corpus WER = (S + D + I) / (S + D + H), as jiwer's."""
    if not len(ids) == len(references) == len(hypotheses):
        raise ValueError(f"{len(ids)} ids, {len(references)} references and {len(hypotheses)} hypotheses")
    if not ids:
        raise WerInputError("empty reference set: nothing to score")
    texts = normalize_texts([*references, *hypotheses], normalizer, workers=workers, progress=progress)
    ref_texts, hyp_texts = texts[: len(ids)], texts[len(ids) :]
    if not any(t.strip() for t in ref_texts):
        raise WerInputError(
            f"empty reference set: all {len(ids)} references are empty after normalisation with {normalizer!r}, "
            "so WER is undefined"
        )
    word_ids = _WordIds()
    utterances = []
    subs = dels = ins = hits = 0
    # One pass, keeping no word lists: holding millions of them makes the cyclic GC the slowest part.
    for uid, ref, hyp in zip(ids, ref_texts, hyp_texts, strict=True):
        ref_words, hyp_words = ref.split(), hyp.split()
        s, d, i = align_counts([word_ids[w] for w in ref_words], [word_ids[w] for w in hyp_words])
        h = len(ref_words) - s - d
        utterances.append(UtteranceErrors(uid, s, d, i, h, " ".join(ref_words), " ".join(hyp_words)))
        subs, dels, ins, hits = subs + s, dels + d, ins + i, hits + h
    return WerResult(
        wer=(subs + dels + ins) / (subs + dels + hits),
        substitutions=subs,
        deletions=dels,
        insertions=ins,
        hits=hits,
        utterances=utterances,
    )
