"""Golden CPT sequences on a hand-made sample (exact ids), frame edges, dedup, determinism across workers.

Ids of the tiny extended model: BPE 0..1999, BOS 2000, EOS 2001, DSU u = 2256 + u, <MM_TEXT> 2556,
<MM_SPEECH> 2557. BPE ids of the words are literal here and cross-checked against the tokenizer's
string path, so the per-word cache of `CPTDataset` is checked against whole-span encoding.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

from ssi.data.cpt import CPTDataset, CPTOptions, SpanSampler, dedup_units, speech_span, time_to_frame
from ssi.data.sources import DataValidationError
from ssi.testing import small_tiktoken_file, special_tokens
from ssi.vocab.tiktoken import SpeechLlama3Tokenizer, load_tokenizer

BOS, EOS, TXT, SPC, DSU0 = 2000, 2001, 2556, 2557, 2256
THE_CAT = [407, 282, 287]  # "the cat"
SAT_DOWN = [115, 287, 719]  # "sat down"
ALL_WORDS = [407, 282, 287, 899, 719]  # "the cat sat down"
# 60 frames at 50 Hz; unit i at frame i except a repeated pair so deduplication has work to do.
SPEECH = list(range(60))
SPEECH[30] = 29
SAMPLE = {
    "ID": "hand-made-1",
    "transcript": "the cat sat down",
    "tokenized": ["the", "cat", "sat", "down"],
    "aligned_token_start_time": [0.0, 0.3, 0.58, 0.9],
    "aligned_token_end_time": [0.3, 0.58, 0.9, 1.2],
    "speech_tokens": SPEECH,
}


def dsu(units) -> list[int]:
    return [DSU0 + u for u in units]


@pytest.fixture(scope="module")
def tok(tiny_extended_dir: Path) -> SpeechLlama3Tokenizer:
    return load_tokenizer(tiny_extended_dir)


@pytest.fixture(scope="module")
def hand_made() -> datasets.Dataset:
    return datasets.Dataset.from_list([SAMPLE])


def build(tok, ds, index: int = 0, fps: float = 50.0, **options):
    return CPTDataset(ds, tok, fps, CPTOptions(**options)).build(index)


def test_word_ids_match_the_string_path(tok) -> None:
    assert tok.encode("the cat", add_bos=False, add_eos=False) == THE_CAT
    assert tok.encode("sat down", add_bos=False, add_eos=False) == SAT_DOWN
    assert tok.encode("the cat sat down", add_bos=False, add_eos=False) == ALL_WORDS


def test_interleaved_golden_both_first_modalities(tok, hand_made) -> None:
    # Fixed spans of 2 words: [the cat] [sat down]. Frames: words 0-1 -> [0, 29), words 2-3 -> [29, 60).
    text_first = [BOS, TXT, *THE_CAT, SPC, *dsu(SPEECH[29:60]), EOS]
    speech_first = [BOS, SPC, *dsu(SPEECH[0:29]), TXT, *SAT_DOWN, EOS]
    seen = set()
    for seed in range(12):
        sample = build(tok, hand_made, sequence_type="interleaved", span=SpanSampler("fixed", mean=2), seed=seed)
        expected = speech_first if sample.tokens[1] == SPC else text_first
        assert sample.tokens == expected
        seen.add(sample.tokens[1])
    assert seen == {TXT, SPC}, "the first modality must be drawn at random"


def test_interleaved_dedup_and_no_modality_tokens(tok, hand_made) -> None:
    for seed in range(6):
        sample = build(tok, hand_made, span=SpanSampler("fixed", mean=2), seed=seed, dedup=True, modality_tokens=False)
        if sample.tokens[1] == DSU0:  # speech first: frames 0..28, no repeats there
            assert sample.tokens == [BOS, *dsu(range(29)), *SAT_DOWN, EOS]
        else:  # text first: frames 29..59 where unit 29 repeats at frame 30 -> collapsed
            assert sample.tokens == [BOS, *THE_CAT, *dsu([29, *range(31, 60)]), EOS]
            assert sample.n_frames == 31 and sample.n_dsu_tokens == 30


def test_concatenated_and_single_modality_golden(tok, hand_made) -> None:
    assert build(tok, hand_made, sequence_type="concatenated_txt_dsu").tokens == [
        BOS, TXT, *ALL_WORDS, SPC, *dsu(SPEECH), EOS
    ]  # fmt: skip
    assert build(tok, hand_made, sequence_type="concatenated_dsu_txt").tokens == [
        BOS, SPC, *dsu(SPEECH), TXT, *ALL_WORDS, EOS
    ]  # fmt: skip
    assert build(tok, hand_made, sequence_type="dsu_only", dedup=True).tokens == [
        BOS,
        SPC,
        *dsu(range(60)[:30]),
        *dsu(range(31, 60)),
        EOS,
    ]
    assert build(tok, hand_made, sequence_type="text_only", add_bos=False, add_eos=False).tokens == [TXT, *ALL_WORDS]


def test_truncation_to_max_seq_len(tok, hand_made) -> None:
    sample = build(tok, hand_made, sequence_type="dsu_only", max_seq_len=10)
    assert sample.tokens == [BOS, SPC, *dsu(range(8))] and sample.truncated
    assert not build(tok, hand_made, sequence_type="text_only", max_seq_len=8).truncated


def test_mixture_draws_every_type_with_its_weight(tok, hand_made) -> None:
    ds = datasets.Dataset.from_list([SAMPLE] * 400)
    options = CPTOptions(sequence_type="mixture", mixture={"dsu_only": 3, "text_only": 1, "interleaved": 0})
    kinds = [CPTDataset(ds, tok, 50.0, options).build(i).sequence_type for i in range(400)]
    assert set(kinds) == {"dsu_only", "text_only"}
    assert 0.65 < kinds.count("dsu_only") / 400 < 0.85


def test_options_are_checked() -> None:
    with pytest.raises(DataValidationError, match=re.escape("needs sequence.mixture")):
        CPTOptions(sequence_type="mixture")
    with pytest.raises(DataValidationError, match="non-negative weights"):
        CPTOptions(sequence_type="mixture", mixture={"bogus": 1.0})
    with pytest.raises(DataValidationError, match=re.escape("sequence.type must be one of")):
        CPTOptions(sequence_type="interleave")
    with pytest.raises(DataValidationError, match=re.escape("span.distribution")):
        SpanSampler("gaussian")


# --- frame-rate conversion at span edges ------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "fps", "rounding", "frame"),
    [
        (0.58, 50, "floor", 29),  # 0.58 * 50 = 28.999999999999996 in binary: still frame 29
        (0.14, 50, "ceil", 7),  # 0.14 * 50 = 7.000000000000001: still ends at frame 7
        (0.291, 50, "floor", 14),  # 14.55
        (0.291, 50, "ceil", 15),
        (0.24, 12.5, "floor", 3),  # Mimi: 3.0
        (1.0, 12.5, "ceil", 13),  # 12.5 -> the partial frame is included
        (1.0, 12.5, "floor", 12),
    ],
)
def test_time_to_frame_edges(seconds: float, fps: float, rounding: str, frame: int) -> None:
    assert time_to_frame(seconds, fps, rounding) == frame


def test_speech_span_covers_floor_start_to_ceil_end_and_clamps() -> None:
    starts, ends = np.array([0.0, 0.3, 0.58]), np.array([0.3, 0.58, 1.23])
    assert speech_span(starts, ends, 1, 2, 50.0, 100) == (15, 29)
    assert speech_span(starts, ends, 2, 3, 50.0, 100) == (29, 62)  # ceil(61.5)
    assert speech_span(starts, ends, 2, 3, 50.0, 61) == (29, 61)  # clamped to the utterance


def test_span_sampler_boundaries_cover_all_words() -> None:
    rng = np.random.default_rng(0)
    for sampler in (SpanSampler("poisson", mean=3), SpanSampler("uniform", low=2, high=4), SpanSampler("binomial")):
        for n_words in (1, 7, 40):
            cuts = sampler.boundaries(rng, n_words)
            assert cuts[0] == 0 and cuts[-1] == n_words and all(b > a for a, b in itertools.pairwise(cuts))
    lengths = SpanSampler("poisson", mean=4).draw(np.random.default_rng(1), 20000)
    assert lengths.min() >= 1 and abs(lengths.mean() - 4) < 0.1


def test_dedup_units() -> None:
    assert dedup_units(np.array([5, 5, 5, 7, 7, 5])).tolist() == [5, 7, 5]
    assert dedup_units(np.array([], dtype=np.int64)).tolist() == []


# --- determinism ------------------------------------------------------------------------------------


def test_same_seed_epoch_index_gives_same_sequence_in_any_worker(tok, synthetic_corpus_dir: Path) -> None:
    ds = datasets.load_dataset(str(synthetic_corpus_dir), split="train")
    options = CPTOptions(sequence_type="mixture", mixture={"interleaved": 2, "concatenated_txt_dsu": 1}, seed=7)
    dataset = CPTDataset(ds, tok, 50.0, options)

    def run(workers: int, epoch: int) -> list[list[int]]:
        dataset.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers)
        return [sample["tokens"] for sample in loader]

    serial, parallel = run(0, 0), run(2, 0)
    assert serial == parallel
    # Resuming mid-epoch or another rank building index 10 alone gives the same sequence.
    fresh = CPTDataset(ds, tok, 50.0, options)
    assert fresh[10]["tokens"] == serial[10]
    other_epoch = run(0, 1)
    assert other_epoch != serial and sum(a != b for a, b in zip(serial, other_epoch, strict=True)) > len(serial) // 4
    assert fresh[10]["labels"] == fresh[10]["tokens"]


def test_a_base_tokenizer_is_refused(hand_made) -> None:
    with pytest.raises(DataValidationError, match="speech-extended tokenizer"):
        base = SpeechLlama3Tokenizer(small_tiktoken_file(), special_tokens=special_tokens(2000))
        CPTDataset(hand_made, base, 50.0, CPTOptions())


def test_word_cache_equals_encoding_the_joined_span(tok) -> None:
    from ssi.data.cpt import _WordCache

    cache = _WordCache(tok, capacity=4)  # small capacity: the cache is cleared along the way
    for words in (
        ["don't", "stop", "it's", "42", "apples,", "Mr.", "Smith"],
        ["naïve", "café", "x1000", "'quoted'", "--", "end."],
        ["the", "the", "the"],
    ):
        assert cache.span(words) == tok.encode(" ".join(words), add_bos=False, add_eos=False)


def test_modality_tokens_need_a_model_extended_with_them(tiny_base_dir: Path, tmp_path: Path, hand_made) -> None:
    from ssi.data.sft import SFTDataset, SFTOptions
    from ssi.vocab.extend import extend_model_dir

    plain = load_tokenizer(extend_model_dir(tiny_base_dir, tmp_path / "m", 300, modality_tokens=False, progress=False))
    with pytest.raises(DataValidationError, match="extended without modality tokens"):
        CPTDataset(hand_made, plain, 50.0, CPTOptions())
    with pytest.raises(DataValidationError, match="extended without modality tokens"):
        SFTDataset(hand_made, plain, SFTOptions())
    tokens = CPTDataset(hand_made, plain, 50.0, CPTOptions("dsu_only", modality_tokens=False)).build(0).tokens
    assert tokens == [BOS, *dsu(SPEECH), EOS] and plain.vocab.vocab_size == 2556
