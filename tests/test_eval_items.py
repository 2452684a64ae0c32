"""The benchmark item format, how items become token sequences (which tokens are scored), and what a
benchmark reports: accuracy with ties, categories, the ZeroSpeech aggregate and submission lines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ssi.eval.benchmark import ItemScore, reduce_score, scores_jsonl, summarize, zerospeech_files
from ssi.eval.items import BenchmarkError, Item, Segment, ZeroSpeechRef, check_units, read_items, write_items
from ssi.eval.sequences import SequenceBuilder, SequenceSettings, resolve_settings
from ssi.vocab.tiktoken import load_tokenizer


def write_lines(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GOOD = {"id": "a", "positive": {"units": [1, 2]}, "negative": {"units": [2, 1]}}


def test_items_round_trip(tmp_path: Path) -> None:
    items = [
        Item("a", Segment(units=(1, 2)), Segment(units=(2, 1)), prefix=Segment(text="hi"), category="x"),
        Item("b", Segment(text="yes"), Segment(text="no"), meta={"voice": "v1"}),
        Item("c", Segment(units=(5,)), Segment(units=(6,)), zerospeech=ZeroSpeechRef("lexical", "dev", "p", "n", "7")),
    ]
    path = tmp_path / "b.jsonl"
    assert write_items(path, items) == 3
    assert read_items(path) == items
    with pytest.raises(FileExistsError):
        write_items(path, items)


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([GOOD, {**GOOD, "negative": {"units": [3]}}], r"b.jsonl:2: duplicate id 'a' \(first on line 1\)"),
        ([{**GOOD, "positive": {"units": []}}], r"b.jsonl:1 \(item 'a'\): positive is empty \(no units\)"),
        ([{**GOOD, "negative": {"text": "  "}}], r"item 'a'\): negative is empty"),
        ([{**GOOD, "positive": {"units": [1], "text": "x"}}], r"positive must be \{\"units\""),
        ([{**GOOD, "prefix": {"units": [1.5]}}], r"prefix.units must be a list of integers"),
        ([{**GOOD, "postive": {"units": [1]}}], r"unknown key\(s\) \['postive'\]"),
        ([{"positive": {"units": [1]}, "negative": {"units": [2]}}], r"b.jsonl:1: missing or empty 'id'"),
        ([{"id": "a", "positive": {"units": [1]}}], r"item 'a'\): missing 'negative'"),
        (["{not json"], r"b.jsonl:1: not valid JSON"),
        ([], r"has no items"),
        (
            [{**GOOD, "prefix": {"units": [1]}, "zerospeech": {"task": "lexical", "split": "dev", "positive": "p",
                                                              "negative": "n", "pair": "1"}}],
            r"a ZeroSpeech item scores whole files, it cannot have a prefix",
        ),
        ([{**GOOD, "category": 3}], r"category must be a string or null"),
    ],
)  # fmt: skip
def test_bad_items_are_named(tmp_path: Path, rows: list, message: str) -> None:
    with pytest.raises(BenchmarkError, match=message):
        read_items(write_lines(tmp_path / "b.jsonl", rows))


def test_units_beyond_the_model_are_named(tmp_path: Path) -> None:
    items = read_items(write_lines(tmp_path / "b.jsonl", [GOOD, {**GOOD, "id": "z", "negative": {"units": [4, 300]}}]))
    check_units(items, 301, "b.jsonl")
    with pytest.raises(
        BenchmarkError, match=r"b.jsonl: item 'z': negative.units\[1\] = 300 is outside the model's 300"
    ):
        check_units(items, 300, "b.jsonl")


def settings(**values: bool) -> SequenceSettings:
    base = {"dedup": False, "modality_tokens": True, "add_bos": True, "add_eos": True}
    return SequenceSettings(**{**base, **values}, source="test")


def test_sequences_follow_the_training_layout(tiny_extended_dir: Path) -> None:
    tok = load_tokenizer(tiny_extended_dir)
    vocab = tok.vocab
    bos, eos, text, speech = tok.bos_id, tok.eos_id, vocab.text_token_id, vocab.speech_token_id
    dsu = vocab.dsu_id
    build = SequenceBuilder(tok, settings()).build

    # no prefix: BOS and the modality token are context; the candidate and EOS are scored
    seq = build(Item("i", Segment(units=(3, 3, 4)), Segment(units=(1,))), Segment(units=(3, 3, 4)), "positive")
    assert seq.tokens == [bos, speech, dsu(3), dsu(3), dsu(4), eos] and seq.start == 2 and seq.n_scored == 4

    # speech -> speech continues the span: no modality token between; dedup spans the boundary
    item = Item("i", Segment(units=(5, 5, 6)), Segment(units=(7,)), prefix=Segment(units=(4, 5)))
    seq = build(item, item.positive, "positive")
    assert seq.tokens == [bos, speech, dsu(4), dsu(5), dsu(5), dsu(5), dsu(6), eos] and seq.start == 4
    dedup = SequenceBuilder(tok, settings(dedup=True)).build(item, item.positive, "positive")
    assert dedup.tokens == [bos, speech, dsu(4), dsu(5), dsu(6), eos] and dedup.start == 4

    # text -> text: the continuation starts with a space, as a word inside an interleaved span does
    item = Item("i", Segment(text="red cat"), Segment(text="dog"), prefix=Segment(text="the big"))
    seq = build(item, item.positive, "positive")
    assert seq.tokens == [bos, text, *tok.encode("the big red cat", add_bos=False, add_eos=False), eos]
    assert seq.tokens[seq.start : -1] == tok.encode(" red cat", add_bos=False, add_eos=False)

    # cross-modal: the candidate's modality token is inserted and is context
    item = Item("i", Segment(text="cat"), Segment(text="dog"), prefix=Segment(units=(9,)))
    seq = build(item, item.positive, "positive")
    assert seq.tokens == [bos, speech, dsu(9), text, *tok.encode("cat", add_bos=False, add_eos=False), eos]
    assert seq.start == 4
    item = Item("i", Segment(units=(1, 2)), Segment(units=(2,)), prefix=Segment(text="cat"))
    seq = SequenceBuilder(tok, settings(add_eos=False)).build(item, item.positive, "positive")
    assert seq.tokens[-3:] == [speech, dsu(1), dsu(2)] and seq.n_scored == 2

    # without modality tokens and BOS nothing precedes an unprefixed candidate: refused
    bare = SequenceBuilder(tok, settings(modality_tokens=False, add_bos=False))
    with pytest.raises(BenchmarkError, match=r"item 'i': nothing precedes the positive candidate"):
        bare.build(Item("i", Segment(units=(1,)), Segment(units=(2,))), Segment(units=(1,)), "positive")
    # a candidate swallowed by dedup into the prefix's last run, with no EOS, has nothing to score
    item = Item("i", Segment(units=(5, 5)), Segment(units=(6,)), prefix=Segment(units=(5,)))
    with pytest.raises(BenchmarkError, match=r"item 'i': the positive candidate has no token left after dedup"):
        SequenceBuilder(tok, settings(dedup=True, add_eos=False)).build(item, item.positive, "positive")


def test_settings_come_from_the_run_unless_given(tmp_path: Path) -> None:
    config = tmp_path / "torchtune_config.yaml"
    config.write_text(
        "data:\n  sequence:\n    dedup: true\n    modality_tokens: false\n    add_bos: true\n    add_eos: false\n"
    )
    got = resolve_settings({"dedup": None, "add_eos": True}, config, True)
    assert (got.dedup, got.modality_tokens, got.add_bos, got.add_eos) == (True, False, True, True)
    assert got.source == f"{config} (data.sequence) + command line"
    outside = resolve_settings({}, None, model_has_modality_tokens=False)
    assert (outside.dedup, outside.modality_tokens, outside.add_bos, outside.add_eos) == (False, False, True, True)
    with pytest.raises(BenchmarkError, match=r"sequence: unsupported key\(s\) \['eos'\]"):
        resolve_settings({"eos": True}, None, True)


def score(item_id: str, pos: float, neg: float, category: str | None = None, ref: ZeroSpeechRef | None = None):
    item = Item(item_id, Segment(units=(1,)), Segment(units=(2,)), category=category, zerospeech=ref)
    return ItemScore(item, pos, neg, 3, 4)


def test_accuracy_counts_ties_as_half_and_reports_categories() -> None:
    scores = [score("a", -1.0, -2.0, "x"), score("b", -3.0, -2.0, "x"), score("c", -1.0, -1.0, "y"), score("d", 0, -1)]
    summary = summarize(scores)
    assert summary["accuracy"] == pytest.approx(2.5 / 4) and summary["n"] == 4 and summary["ties"] == 1
    assert summary["categories"] == {"x": {"accuracy": 0.5, "n": 2}, "y": {"accuracy": 0.5, "n": 1}}
    rows = [json.loads(line) for line in scores_jsonl(scores).splitlines()]
    assert rows[2] == {
        "id": "c",
        "category": "y",
        "positive": -1.0,
        "negative": -1.0,
        "correct": 0.5,
        "n_positive_tokens": 3,
        "n_negative_tokens": 4,
    }
    assert reduce_score(-6.0, 4, "mean") == -1.5 and reduce_score(-6.0, 4, "sum") == -6.0


def test_zerospeech_aggregate_and_submission_lines() -> None:
    def ref(pos: str, neg: str, pair: str) -> ZeroSpeechRef:
        return ZeroSpeechRef("lexical", "dev", pos, neg, pair)

    # pair 1: two voices, one right one wrong (0.5); pair 2: right (1.0) -> official score 0.75, item mean 2/3
    scores = [score("1", -1, -2, ref=ref("w1", "n1", "1")), score("2", -3, -2, ref=ref("w2", "n2", "1"))]
    scores.append(score("3", -1, -5, ref=ref("w3", "n3", "2")))
    summary = summarize(scores)
    assert summary["accuracy"] == pytest.approx(2 / 3)
    assert summary["zerospeech"] == {"lexical/dev": {"accuracy": 0.75, "n_pairs": 2}}
    files = zerospeech_files(scores)
    lines = files["lexical/dev.txt"].splitlines()
    assert [line.split(" ") for line in lines][:2] == [["w1", "-1"], ["n1", "-2"]]
    assert {line.split(" ")[0] for line in lines} == {"w1", "n1", "w2", "n2", "w3", "n3"}
    clash = [score("1", -1, -2, ref=ref("w1", "n1", "1")), score("2", -1.5, -2, ref=ref("w1", "n9", "1"))]
    with pytest.raises(BenchmarkError, match=r"item '2': file 'w1' scored -1.5 here but -1 in another item"):
        zerospeech_files(clash)
