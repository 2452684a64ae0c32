"""The token-ID layout (docs/vocabulary.md) and its manifest."""

from __future__ import annotations

import json

import pytest

from ssi.testing import special_tokens
from ssi.vocab.layout import (
    DSU_CHAR_OFFSET,
    MAX_DSUS,
    MODALITY_SPEECH,
    MODALITY_TEXT,
    SpeechVocab,
    VocabError,
    char_to_dsu,
    dsu_to_char,
    dsus_to_text,
    text_to_dsus,
)


def test_dsu_characters_are_private_use_area_a() -> None:
    assert dsu_to_char(0) == "\U000f0000"
    assert dsu_to_char(MAX_DSUS - 1) == "\U000ffffd"
    assert char_to_dsu("\U000f0011") == 0x11
    assert text_to_dsus(dsus_to_text([3, 0, 65533])) == [3, 0, 65533]


@pytest.mark.parametrize("unit", [-1, MAX_DSUS, MAX_DSUS + 1, 10**6])
def test_out_of_range_units_are_errors_not_wraparound(unit: int) -> None:
    with pytest.raises(VocabError, match=f"DSU {unit} is outside"):
        dsu_to_char(unit)


@pytest.mark.parametrize("char", ["a", "\U000ffffe", chr(DSU_CHAR_OFFSET - 1), "ab"])
def test_non_dsu_characters_are_rejected(char: str) -> None:
    with pytest.raises(VocabError, match="is not a DSU character"):
        char_to_dsu(char)


def test_special_ids_are_looked_up_by_name_in_the_recorded_table() -> None:
    vocab = SpeechVocab(n_bpe=2000, n_dsus=300, special_tokens=special_tokens(2000, "3.1"))
    assert vocab.special_id("<|eot_id|>") == 2009 and vocab.pad_token_id == 2004  # <|finetune_right_pad_id|>
    assert vocab.stop_token_ids == [2001, 2009, 2008]  # end_of_text, eot, eom
    llama_3_0 = SpeechVocab(n_bpe=2000, n_dsus=300, special_tokens=special_tokens(2000, "3.0"))
    assert llama_3_0.stop_token_ids == [2001, 2009] and llama_3_0.pad_token_id == 2001  # no eom, no pad token
    with pytest.raises(VocabError, match=r"no special token <\|eom_id\|>"):
        llama_3_0.special_id("<|eom_id|>")
    with pytest.raises(VocabError, match="built without the base's special-token table"):
        _ = SpeechVocab(n_bpe=2000, n_dsus=300).stop_token_ids


def test_vocab_layout_appends_dsus_then_modality_tokens() -> None:
    vocab = SpeechVocab(n_bpe=128000, n_dsus=5000)
    assert vocab.base_vocab_size == 128256
    assert vocab.dsu_id(0) == 128256 and vocab.dsu_id(4999) == 133255
    assert vocab.text_token_id == 133256 and vocab.speech_token_id == 133257
    assert vocab.vocab_size == 133258
    assert vocab.modality_token_ids == {MODALITY_TEXT: 133256, MODALITY_SPEECH: 133257}
    plain = SpeechVocab(n_bpe=128000, n_dsus=5000, modality_tokens=False)
    assert plain.vocab_size == 133256 and plain.text_token_id is None and plain.modality_token_ids == {}


def test_dsu_ids_check_range_and_name_the_sample() -> None:
    vocab = SpeechVocab(n_bpe=2000, n_dsus=10)
    assert vocab.dsu_ids([0, 9, 9]) == [2256, 2265, 2265]
    with pytest.raises(VocabError, match=r"DSU id 10 in sample 'utt-7' is outside \[0, 10\)"):
        vocab.check_units([1, 10], where="sample 'utt-7'")
    with pytest.raises(VocabError, match="DSU id -1"):
        vocab.dsu_ids([-1])


@pytest.mark.parametrize("n_dsus", [0, -5, MAX_DSUS + 1])
def test_vocab_rejects_impossible_sizes(n_dsus: int) -> None:
    with pytest.raises(VocabError, match="n_dsus must be in"):
        SpeechVocab(n_bpe=2000, n_dsus=n_dsus)


def test_manifest_round_trip_and_config_check(tmp_path) -> None:
    vocab = SpeechVocab(2000, 300, True, "Llama-3.2-1B", "hubert-large-l22-km5000", 50.0, special_tokens(2000))
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": vocab.vocab_size}))
    vocab.save(tmp_path, extra={"extension": {"init": "mean"}})
    data = json.loads((tmp_path / "ssi.json").read_text())
    assert data["id_ranges"]["dsu"] == [2256, 2556]
    assert data["modality_token_ids"] == {MODALITY_TEXT: 2556, MODALITY_SPEECH: 2557}
    assert data["extension"] == {"init": "mean"}
    assert SpeechVocab.load(tmp_path) == vocab

    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 2556}))
    with pytest.raises(VocabError, match=r"vocab_size 2556 disagrees with .*ssi.json"):
        SpeechVocab.load(tmp_path)


def test_manifest_errors_are_specific(tmp_path) -> None:
    with pytest.raises(VocabError, match=r"ssi.json not found: .* is not a speech-extended model"):
        SpeechVocab.load(tmp_path)
    manifest = SpeechVocab(2000, 300, special_tokens=special_tokens(2000)).to_manifest()
    (tmp_path / "ssi.json").write_text(json.dumps({**manifest, "vocab_size": 9999}))
    with pytest.raises(VocabError, match="vocab_size 9999 does not match the layout"):
        SpeechVocab.load(tmp_path, check_config=False)
    (tmp_path / "ssi.json").write_text(json.dumps({"format_version": 2, "n_bpe": 2000}))
    with pytest.raises(VocabError, match=r"missing keys \['n_dsus', 'modality_tokens'\]"):
        SpeechVocab.load(tmp_path, check_config=False)
