"""The tiktoken path (torchtune) and the HF path (transformers/vLLM) give identical ids for any string."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from torchtune.data import Message
from torchtune.modules.transforms.tokenizers import TikTokenBaseTokenizer
from transformers import AutoTokenizer

from ssi.vocab.layout import MODALITY_SPEECH, MODALITY_TEXT, SpeechVocab, VocabError, dsu_to_char, dsus_to_text
from ssi.vocab.tiktoken import SpeechLlama3Tokenizer, load_tokenizer

WORDS = ["the", " cat", "Hello", "world", "ASR", "speech", "über", "日本語", "naïve", "1234567", "don't", "we'll"]
PUNCT = [" ", "  ", "\n", "\n\n", "\t", ",", ".", "!?", "'", '"', "(", ")", " - ", "...", "<", "|", ">"]
SPECIALS = ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|reserved_special_token_9|>", "<|foo|>"]


def random_strings(n_dsus: int, count: int, seed: int = 0) -> list[str]:
    """Strings mixing words, whitespace, punctuation, unicode, DSU runs, modality and special tokens."""
    rng = random.Random(seed)
    strings = []
    for _ in range(count):
        parts = []
        for _ in range(rng.randint(1, 25)):
            kind = rng.random()
            if kind < 0.35:
                parts.append(rng.choice(WORDS))
            elif kind < 0.6:
                parts.append(rng.choice(PUNCT))
            elif kind < 0.8:
                parts.append(dsus_to_text(rng.randrange(n_dsus) for _ in range(rng.randint(1, 8))))
            elif kind < 0.9:
                parts.append(rng.choice([MODALITY_TEXT, MODALITY_SPEECH]))
            else:
                parts.append(rng.choice(SPECIALS))
        strings.append("".join(parts))
    return strings


@pytest.fixture(scope="module")
def tt_tokenizer(tiny_extended_dir: Path) -> SpeechLlama3Tokenizer:
    return load_tokenizer(tiny_extended_dir)


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_extended_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_extended_dir)


def test_tiktoken_and_hf_paths_agree_on_random_strings(tt_tokenizer, hf_tokenizer) -> None:
    vocab = tt_tokenizer.vocab
    for text in random_strings(vocab.n_dsus, 400):
        ours = tt_tokenizer.encode(text, add_bos=False, add_eos=False)
        assert ours == hf_tokenizer(text, add_special_tokens=False)["input_ids"], text
        # BOS handling agrees too (HF's post-processor adds <|begin_of_text|>)
        assert tt_tokenizer.encode(text, add_bos=True, add_eos=False) == hf_tokenizer(text)["input_ids"]


def test_each_dsu_and_modality_token_is_one_id(tt_tokenizer, hf_tokenizer) -> None:
    vocab: SpeechVocab = tt_tokenizer.vocab
    for unit in [0, 1, 17, vocab.n_dsus - 1]:
        expected = [vocab.n_bpe + 256 + unit]
        assert tt_tokenizer.encode(dsu_to_char(unit), add_bos=False, add_eos=False) == expected
        assert hf_tokenizer(dsu_to_char(unit), add_special_tokens=False)["input_ids"] == expected
    units = list(range(vocab.n_dsus))
    assert tt_tokenizer.encode(dsus_to_text(units), add_bos=False, add_eos=False) == vocab.dsu_ids(units)
    for token, token_id in vocab.modality_token_ids.items():
        assert tt_tokenizer.encode(token, add_bos=False, add_eos=False) == [token_id]
        assert hf_tokenizer(token, add_special_tokens=False)["input_ids"] == [token_id]


def test_text_encodes_exactly_as_the_base_tokenizer(tt_tokenizer, tiny_base_dir: Path) -> None:
    base_tiktoken = TikTokenBaseTokenizer(
        str(tiny_base_dir / "original/tokenizer.model"),
        name="base",
        pattern=tt_tokenizer.tt_model.tt_model._pat_str,
        bos_id=2000,
        eos_id=2001,
        special_tokens=tt_tokenizer.special_tokens,
    )
    base_hf = AutoTokenizer.from_pretrained(tiny_base_dir)
    rng = random.Random(1)
    for _ in range(200):
        text = "".join(rng.choice(WORDS + PUNCT) for _ in range(rng.randint(1, 30)))
        ours = tt_tokenizer.encode(text, add_bos=False, add_eos=False)
        assert ours == base_tiktoken.encode(text, add_bos=False, add_eos=False), text
        assert ours == base_hf(text, add_special_tokens=False)["input_ids"], text


def test_decode_round_trips(tt_tokenizer, hf_tokenizer) -> None:
    for text in random_strings(tt_tokenizer.vocab.n_dsus, 100, seed=3):
        ids = tt_tokenizer.encode(text, add_bos=False, add_eos=False)
        assert tt_tokenizer.decode(ids, skip_special_tokens=False) == text
        assert hf_tokenizer.decode(ids) == text
    text = f"hi {MODALITY_SPEECH}{dsus_to_text([4, 4, 2])}{MODALITY_TEXT} there"
    ids = tt_tokenizer.encode(text, add_bos=True, add_eos=True)
    assert tt_tokenizer.decode(ids) == "hi " + dsus_to_text([4, 4, 2]) + " there"
    assert tt_tokenizer.decode(ids) == hf_tokenizer.decode(ids, skip_special_tokens=True)


def test_out_of_vocabulary_dsus_are_errors(tt_tokenizer) -> None:
    n = tt_tokenizer.vocab.n_dsus
    with pytest.raises(VocabError, match=f"unit {n}\\) at text position 3 is outside this model's {n} DSUs"):
        tt_tokenizer.encode("abc" + dsu_to_char(n), add_bos=False, add_eos=False)
    with pytest.raises(VocabError, match="outside the vocabulary"):
        tt_tokenizer.decode([tt_tokenizer.vocab.vocab_size])


def test_chat_format_masks_the_prompt(tt_tokenizer) -> None:
    speech = MODALITY_SPEECH + dsus_to_text([1, 2, 3]) + MODALITY_TEXT
    messages = [
        Message(role="user", content=speech, masked=True),
        Message(role="assistant", content="the cat", masked=False),
    ]
    tokens, mask = tt_tokenizer.tokenize_messages(messages)
    vocab = tt_tokenizer.vocab
    header = [tt_tokenizer.start_header_id, *tt_tokenizer.encode("user", False, False), tt_tokenizer.end_header_id]
    assert tokens[: 1 + len(header)] == [tt_tokenizer.bos_id, *header]
    speech_ids = [vocab.speech_token_id, *vocab.dsu_ids([1, 2, 3]), vocab.text_token_id]
    start = tokens.index(vocab.speech_token_id)
    assert tokens[start : start + 5] == speech_ids
    assert tokens[-2:] == [tt_tokenizer.eot_id, tt_tokenizer.eos_id]
    answer = tt_tokenizer.encode("the cat", False, False)
    answer_start = len(tokens) - 2 - len(answer)
    assert tokens[answer_start:-2] == answer
    user_len = len(tt_tokenizer.tokenize_message(messages[0]))
    assert mask == [True] * (1 + user_len) + [False] * (len(tokens) - 2 - user_len) + [True]


def test_manifest_and_tokenizer_file_must_agree(tiny_extended_dir: Path) -> None:
    wrong = SpeechVocab(n_bpe=1999, n_dsus=10)
    with pytest.raises(VocabError, match="has 2000 BPE ranks but the manifest says n_bpe=1999"):
        SpeechLlama3Tokenizer(tiny_extended_dir / "original/tokenizer.model", vocab=wrong)


def test_manifests_written_before_the_table_was_recorded_still_load(tiny_extended_dir: Path, tmp_path: Path) -> None:
    import json
    import shutil

    old = tmp_path / "old"
    shutil.copytree(tiny_extended_dir, old)
    manifest = json.loads((old / "ssi.json").read_text())
    for key in ("special_tokens", "stop_tokens", "pad_token"):
        del manifest[key]
    (old / "ssi.json").write_text(json.dumps({**manifest, "format_version": 1}))
    assert SpeechVocab.load(old).special_tokens == SpeechVocab.load(tiny_extended_dir).special_tokens
    assert load_tokenizer(old).stop_tokens == load_tokenizer(tiny_extended_dir).stop_tokens
