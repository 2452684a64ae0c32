"""SFT ASR examples: exact Llama 3 chat ids, masks (-100 exactly where masked) and inference prompts."""

from __future__ import annotations

from pathlib import Path

import datasets
import pytest

from ssi.data.sft import SFTDataset, SFTOptions
from ssi.data.sources import DataValidationError
from ssi.vocab.tiktoken import SpeechLlama3Tokenizer, load_tokenizer

BOS, EOS, START, END, EOT, TXT, SPC, DSU0 = 2000, 2001, 2006, 2007, 2009, 2556, 2557, 2256
NL2 = [10, 10]  # "\n\n" in the 2,000-rank test vocabulary
SYSTEM, USER, ASSISTANT = [115, 121, 322, 398], [477, 273], [520, 511, 446]
SYSTEM_PROMPT = "You are a speech recognizer."
SYSTEM_PROMPT_IDS = [1539, 470, 258, 1819, 310, 1604, 697, 110, 786, 273, 46]
TRANSCRIPT_IDS = [407, 282, 287, 899, 719]  # "the cat sat down"
UNITS = [5, 5, 9, 9, 9, 2]
SAMPLE = {
    "ID": "utt-42",
    "transcript": "the cat sat down",
    "tokenized": ["the", "cat", "sat", "down"],
    "aligned_token_start_time": [0.0, 0.02, 0.04, 0.06],
    "aligned_token_end_time": [0.02, 0.04, 0.06, 0.12],
    "speech_tokens": UNITS,
}


@pytest.fixture(scope="module")
def tok(tiny_extended_dir: Path) -> SpeechLlama3Tokenizer:
    return load_tokenizer(tiny_extended_dir)


@pytest.fixture(scope="module")
def ds() -> datasets.Dataset:
    return datasets.Dataset.from_list([SAMPLE])


def header(role: list[int]) -> list[int]:
    return [START, *role, END, *NL2]


def test_literal_ids_match_the_tokenizer(tok) -> None:
    for text, ids in (("system", SYSTEM), ("user", USER), ("assistant", ASSISTANT), ("\n\n", NL2)):
        assert tok.encode(text, add_bos=False, add_eos=False) == ids
    assert tok.encode(SYSTEM_PROMPT, add_bos=False, add_eos=False) == SYSTEM_PROMPT_IDS


def test_training_example_masks_the_prompt(tok, ds) -> None:
    example = SFTDataset(ds, tok, SFTOptions(system_prompt=SYSTEM_PROMPT))[0]
    speech = [SPC, *(DSU0 + u for u in UNITS), TXT]
    prompt = [BOS, *header(SYSTEM), *SYSTEM_PROMPT_IDS, EOT, *header(USER), *speech, EOT]
    answer_header = header(ASSISTANT)
    answer = [*TRANSCRIPT_IDS, EOT]
    assert example["tokens"] == [*prompt, *answer_header, *answer, EOS]
    # The assistant turn (header included, as torchtune masks per message) is trained; BOS/EOS never.
    assert example["labels"] == [-100] * len(prompt) + answer_header + answer + [-100]


def test_train_on_input_unmasks_prompt_but_not_bos_eos(tok, ds) -> None:
    example = SFTDataset(ds, tok, SFTOptions(train_on_input=True))[0]
    tokens, labels = example["tokens"], example["labels"]
    assert labels[0] == -100 and labels[-1] == -100
    assert labels[1:-1] == tokens[1:-1]


def test_dedup_no_modality_tokens_and_instruction(tok, ds) -> None:
    options = SFTOptions(modality_tokens=False, dedup=True, instruction="Transcribe the audio.")
    example = SFTDataset(ds, tok, options)[0]
    user_body = [*tok.encode("Transcribe the audio.\n", add_bos=False, add_eos=False), DSU0 + 5, DSU0 + 9, DSU0 + 2]
    assert example["tokens"][: 1 + len(header(USER)) + len(user_body) + 1] == [BOS, *header(USER), *user_body, EOT]


def test_inference_prompt_ends_with_assistant_header(tok, ds) -> None:
    example = SFTDataset(ds, tok, SFTOptions(), inference=True)[0]
    speech = [SPC, *(DSU0 + u for u in UNITS), TXT]
    assert example["tokens"] == [BOS, *header(USER), *speech, EOT, *header(ASSISTANT)]
    assert example["id"] == "utt-42" and example["reference"] == "the cat sat down"
    assert "labels" not in example and EOS not in example["tokens"]


def test_truncation_and_inference_overflow(tok, ds) -> None:
    example = SFTDataset(ds, tok, SFTOptions(max_seq_len=12))[0]
    assert len(example["tokens"]) == 12 == len(example["labels"])
    with pytest.raises(
        DataValidationError, match=r"sample 'utt-42': the prompt has 23 tokens, more than max_seq_len=12"
    ):
        SFTDataset(ds, tok, SFTOptions(max_seq_len=12), inference=True)[0]
