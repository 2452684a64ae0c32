"""Converters from the published benchmark forms, on small files written here in those forms (nothing is
downloaded): ZeroSpeech 2021 gold files with encoded units (and the submission files scripts/evaluate.py
writes for them), spoken StoryCloze in both layouts, SALMon, BLiMP and StoryCloze as text, the synthetic corpus."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ssi.eval.converters.blimp import blimp_items
from ssi.eval.converters.cli import main as convert
from ssi.eval.converters.salmon import salmon_items
from ssi.eval.converters.storycloze import spoken_pairs, spoken_triplets, text_items
from ssi.eval.converters.synthetic import runs, synthetic_items
from ssi.eval.converters.units import UnitsTable
from ssi.eval.converters.zerospeech import lexical_items, syntactic_items
from ssi.eval.items import BenchmarkError, Segment, read_items
from ssi.eval.pipeline import run_evaluation

from .test_train_recipe import make_cfg

LEXICAL_COLUMNS = ["filename", "id", "voice", "frequency", "word", "phones", "length", "correct"]
# The published column orders: the official scorers pick some columns by position.
SYNTACTIC_COLUMNS = ["filename", "id", "voice", "type", "subtype", "transcription", "correct"]
# Word frequencies on every band edge of the official binning (and one without a frequency: in no band).
LEXICAL_WORDS = [("cat", 0, 3), ("house", 3, 5), ("river", 150, 5), ("dog", 1, 3), ("tree", 4, 4), ("bird", 5, 4),
                 ("stone", 19, 5), ("lamp", 20, 4), ("glass", 99, 5), ("chair", 100, 5), ("mug", "", 3)]  # fmt: skip


def encoded_folder(path: Path, units: dict[str, list[int]]) -> Path:
    """A units table in the layout scripts/encode_audio.py writes: data/<split>-00000-of-00001.parquet, ID = stem."""
    (path / "data").mkdir(parents=True)
    table = pa.table(
        {
            "ID": list(units),
            "transcript": [""] * len(units),
            "speech_tokens": pa.array(list(units.values()), pa.list_(pa.int64())),
        }
    )
    pq.write_table(table, path / "data" / "train-00000-of-00001.parquet")
    (path / "encoding.json").write_text("{}")
    return path


def write_csv(path: Path, columns: list[str], rows: list[list]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows(rows)
    return path


def random_units(rng: np.random.Generator) -> list[int]:
    return rng.integers(0, 300, int(rng.integers(4, 12))).tolist()


SYNTAX_TYPES = ("anaphor_agreement", "filler_gap")


@pytest.fixture
def zr2021(tmp_path: Path) -> tuple[Path, Path]:
    """A ZeroSpeech 2021 dataset root (lexical/dev, syntactic/dev gold files) and the units of its wavs."""
    rng = np.random.default_rng(0)
    lexical = []
    for pair_id, (word, frequency, length) in enumerate(LEXICAL_WORDS):
        for voice in ("Alex", "Daniel"):
            lexical.append([f"w{pair_id}{voice}", pair_id, voice, frequency, word, "k a t", length, 1])
            lexical.append([f"n{pair_id}{voice}", pair_id, voice, "", "", "k o t", length, 0])
    write_csv(tmp_path / "zr/lexical/dev/gold.csv", LEXICAL_COLUMNS, lexical)
    syntactic = []
    for pair_id in range(2):
        for voice in ("Alex", "Daniel"):
            syntactic.append([f"s{pair_id}{voice}", pair_id, voice, SYNTAX_TYPES[pair_id], "sg", "he saw himself", 1])
    for pair_id in range(2):
        for voice in ("Alex", "Daniel"):
            syntactic.append([f"b{pair_id}{voice}", pair_id, voice, SYNTAX_TYPES[pair_id], "sg", "he saw herself", 0])
    write_csv(tmp_path / "zr/syntactic/dev/gold.csv", SYNTACTIC_COLUMNS, syntactic)
    stems = [row[0] for row in lexical + syntactic]
    return tmp_path / "zr", encoded_folder(tmp_path / "enc", {s: random_units(rng) for s in stems})


def test_zerospeech_lexical_and_syntactic_items(zr2021: tuple[Path, Path]) -> None:
    dataset, enc = zr2021
    table = UnitsTable(str(enc))
    lexical = lexical_items(dataset, "dev", table)
    assert len(lexical) == 2 * len(LEXICAL_WORDS) and lexical[0].id == "w0Alex>n0Alex"
    assert lexical[0].positive.units == tuple(table.lookup("w0Alex")) and lexical[0].prefix is None
    # the official intervals [0,1) [1,5) [5,20) [20,100) [100,inf), whatever their labels say
    bands = ["oov", "1-5", ">100", "1-5", "1-5", "6-20", "6-20", "21-100", "21-100", ">100", None]
    assert [i.category for i in lexical[::2]] == bands
    assert lexical[0].zerospeech is not None and lexical[0].zerospeech.groups == (("frequency", "oov"), ("length", "3"))
    assert lexical[-1].zerospeech is not None and lexical[-1].zerospeech.groups == (("length", "3"),)
    assert lexical[1].zerospeech is not None and lexical[1].zerospeech.pair == "0"
    assert lexical[1].meta is not None and lexical[1].meta["non_word"] == "k o t"  # no written form: phones
    syntactic = syntactic_items(dataset, "dev", table)
    assert [(i.zerospeech.positive, i.zerospeech.negative) for i in syntactic if i.zerospeech] == [
        ("s0Alex", "b0Alex"),
        ("s0Daniel", "b0Daniel"),
        ("s1Alex", "b1Alex"),
        ("s1Daniel", "b1Daniel"),
    ]
    assert [i.category for i in syntactic] == ["anaphor_agreement", "anaphor_agreement", "filler_gap", "filler_gap"]


def test_zerospeech_gold_problems_are_refused(zr2021: tuple[Path, Path], tmp_path: Path) -> None:
    dataset, enc = zr2021
    table = UnitsTable(str(enc))
    gold = dataset / "syntactic/dev/gold.csv"
    rows = list(csv.reader(gold.open()))
    rows[1], rows[2] = rows[2], rows[1]  # the first correct row now pairs with another voice's incorrect row
    write_csv(gold, rows[0], rows[1:])
    with pytest.raises(BenchmarkError, match=r"lines 2 and 6 are paired by position .* differ in \['voice'\]"):
        syntactic_items(dataset, "dev", table)
    write_csv(gold, rows[0], rows[1:-1])
    with pytest.raises(BenchmarkError, match=r"4 correct and 3 incorrect rows; the scorer pairs them by position"):
        syntactic_items(dataset, "dev", table)
    lexical = dataset / "lexical/dev/gold.csv"
    rows = list(csv.reader(lexical.open()))
    write_csv(lexical, rows[0], rows[1:-1])
    with pytest.raises(BenchmarkError, match=r"file 'w10Daniel' \(id 10, voice Daniel\) has no partner"):
        lexical_items(dataset, "dev", table)
    write_csv(
        lexical,
        rows[0],
        [*rows[1:], ["w99Alex", 99, "Alex", 1, "x", "x", 1, 1], ["n99Alex", 99, "Alex", "", "", "y", 1, 0]],
    )
    with pytest.raises(BenchmarkError, match=r"no units for 'w99Alex'"):
        lexical_items(dataset, "dev", table)


def official_scores(gold: Path, submission: Path, task: str) -> dict:
    """The ZR2021 scorer's tables, re-derived here with pandas from its published rules (zerospeech-benchmarks
    0.9.4; it cannot be installed with a current pip). Pairs: lexical, the word and non-word of the same id and
    voice; syntactic, the k-th correct and k-th incorrect row, with columns picked by position as the scorer
    does (so a gold file in another column order gives other figures). Pair score 1 / 0.5 / 0, mean over voices
    per pair key; overall = mean over keys; lexical bands = pd.cut at [0, 1, 5, 20, 100, inf) closed on the left,
    in-vocabulary = the bands but oov weighted by their counts; breakdowns give count, mean and sample std."""
    import pandas as pd

    sub = pd.read_csv(submission, sep=" ", header=None, names=["filename", "score"], index_col="filename")
    table = pd.read_csv(gold, header=0, index_col="filename")
    assert set(sub.index) == set(table.index), "the submission must list exactly the gold files"
    table = table.join(sub)
    good, bad = table[table.correct == 1], table[table.correct == 0]
    if task == "lexical":
        pairs = good.reset_index().merge(bad.reset_index(), on=["id", "voice"], suffixes=("", "_nw"))
        keys = ["id"]
    else:
        # by position: id, voice, type, subtype are columns 0..3 after the filename index
        pairs = pd.DataFrame(
            {name: good.iloc[:, i].to_numpy() for i, name in enumerate(["id", "voice", "type", "subtype"])}
        )
        pairs["score"], pairs["score_nw"] = good.score.to_numpy(), bad.score.to_numpy()
        keys = ["type", "subtype", "id"]
    pairs["pair"] = 0.5 * (pairs.score == pairs.score_nw) + (pairs.score > pairs.score_nw)
    by_pair = pairs.groupby(keys, sort=False).agg(
        score=("pair", "mean"), **({"frequency": ("frequency", "first"), "length": ("length", "first")}
                                   if task == "lexical" else {"type_": ("type", "first")})
    )  # fmt: skip

    def table_of(groups) -> dict:
        agg = by_pair.score.groupby(groups, observed=True).agg(["count", "mean", "std"])
        return {
            str(k): (int(r["count"]), r["mean"], None if np.isnan(r["std"]) else r["std"]) for k, r in agg.iterrows()
        }

    out = {"accuracy": by_pair.score.mean()}
    if task == "lexical":
        bands = pd.cut(
            by_pair.frequency.astype("Int64"), [0, 1, 5, 20, 100, float("inf")],
            labels=["oov", "1-5", "6-20", "21-100", ">100"], right=False,
        )  # fmt: skip
        out["by_frequency"], out["by_length"] = table_of(bands), table_of(by_pair.length)
        known = {k: v for k, v in out["by_frequency"].items() if k != "oov"}
        out["in_vocab"] = np.average([v[1] for v in known.values()], weights=[v[0] for v in known.values()])
    else:
        out["by_type"] = table_of(by_pair.type_)
    return out


def test_zerospeech_summaries_equal_the_official_tables(
    zr2021: tuple[Path, Path], tiny_extended_dir: Path, tmp_path: Path, capsys
) -> None:
    dataset, enc = zr2021
    for task in ("lexical", "syntactic"):
        items = tmp_path / f"{task}.jsonl"
        assert convert([f"zr2021-{task}", "--dataset", str(dataset), "--units", str(enc), "--output", str(items)]) == 0
        assert f"zr2021-{task}: wrote " in capsys.readouterr().out
        given = [f"model={tiny_extended_dir}", f"benchmark={items}", f"output_dir={tmp_path / 'out'}"]
        summary = run_evaluation(make_cfg("evaluate", given))
        submission = tmp_path / "out" / task / "zerospeech" / task / "dev.txt"
        official = official_scores(dataset / task / "dev" / "gold.csv", submission, task)
        ours = summary["zerospeech"][f"{task}/dev"]
        assert ours["accuracy"] == pytest.approx(official["accuracy"])
        breakdowns = ("by_frequency", "by_length") if task == "lexical" else ("by_type",)
        for breakdown in breakdowns:
            assert list(ours[breakdown]) == list(official[breakdown]), breakdown  # same groups, same order
            for name, (n, score, std) in official[breakdown].items():
                row = ours[breakdown][name]
                assert (row["n"], row["score"]) == (n, pytest.approx(score)), (breakdown, name)
                assert row["std"] == (None if std is None else pytest.approx(std)), (breakdown, name)
        if task == "lexical":
            assert ours["in_vocab"] == pytest.approx(official["in_vocab"])
            assert sum(v["n"] for v in ours["by_frequency"].values()) == len(LEXICAL_WORDS) - 1  # "mug": no band
        assert summary["n"] == len(read_items(items))
        assert json.loads((tmp_path / "out" / task / "summary.json").read_text())["zerospeech"][f"{task}/dev"] == ours


def test_spoken_storycloze_pairs(tmp_path: Path) -> None:
    root = tmp_path / "sSC"
    root.mkdir()
    names = ["0_story.wav", "1_story.wav", "2_story.wav", "10_story.wav"]  # 10 sorts after 2 as a number
    for name in names:
        (root / name).touch()
    units = tmp_path / "units.jsonl"
    units.write_text("".join(json.dumps({"file": n, "units": [i + 1, i + 2]}) + "\n" for i, n in enumerate(names)))
    items = spoken_pairs(root, UnitsTable(str(units)))
    assert [(i.id, i.positive.units, i.negative.units) for i in items] == [
        ("0_story", (1, 2), (2, 3)),
        ("2_story", (3, 4), (4, 5)),
    ]
    (root / "2_other.wav").touch()
    with pytest.raises(BenchmarkError, match=r"'2_other.wav' and '2_story.wav' share the number 2: .* ambiguous"):
        spoken_pairs(root, UnitsTable(str(units)))
    (root / "2_other.wav").unlink()
    (root / "story.wav").touch()
    with pytest.raises(BenchmarkError, match=r"story.wav: layout=pairs needs names '<integer>_...wav'"):
        spoken_pairs(root, UnitsTable(str(units)))
    (root / "story.wav").unlink()
    (root / "11_story.wav").touch()
    with pytest.raises(BenchmarkError, match=r"5 files, an odd number"):
        spoken_pairs(root, UnitsTable(str(units)))


def test_spoken_storycloze_triplets_in_every_direction(tmp_path: Path) -> None:
    root = tmp_path / "triplets"
    root.mkdir()
    table = {}
    for n, base in enumerate(("s1", "s2")):
        for part in ("mutual", "correct", "incorrect"):
            (root / f"{base}_{part}.wav").touch()
            (root / f"{base}_{part}.txt").write_text(f"{part} of {base}\n")
            table[f"{base}_{part}"] = [n, len(part)]
    units = encoded_folder(tmp_path / "enc", table)
    for prefix, continuation in (("speech", "speech"), ("text", "speech"), ("speech", "text"), ("text", "text")):
        items = spoken_triplets(root, UnitsTable(str(units)), prefix, continuation)
        first = items[0]
        assert first.id == "s1" and first.category == f"{prefix}->{continuation}"
        assert first.prefix == (Segment(units=(0, 6)) if prefix == "speech" else Segment(text="mutual of s1"))
        if continuation == "text":
            assert (first.positive.text, first.negative.text) == ("correct of s1", "incorrect of s1")
        else:
            assert (first.positive.units, first.negative.units) == ((0, 7), (0, 9))
    (root / "s2_incorrect.txt").unlink()
    with pytest.raises(BenchmarkError, match=r"s2_incorrect.txt is missing \(story 's2', incorrect as text\)"):
        spoken_triplets(root, None, "text", "text")
    (root / "s3_incorrect.wav").touch()
    with pytest.raises(BenchmarkError, match=r"s3_incorrect.wav: not part of a"):
        spoken_triplets(root, UnitsTable(str(units)), "speech", "speech")


def test_salmon(tmp_path: Path) -> None:
    root = tmp_path / "salmon_benchmark"
    per_task, flat_keys = {}, {}
    for task in ("bg_alignment", "speaker_consistency"):
        (root / task).mkdir(parents=True)
        units = {}
        for index in range(3):
            for k in (0, 1):
                (root / task / f"sample_{index}_{k}.wav").touch()
                units[f"sample_{index}_{k}"] = [index, k, len(task)]
                flat_keys[f"{task}/sample_{index}_{k}.wav"] = [index, k, len(task)]
        per_task[task] = encoded_folder(tmp_path / f"enc_{task}", units)
    items = salmon_items(root, str(tmp_path / "enc_{task}"), None)
    assert len(items) == 6 and Counter(i.category for i in items) == {"bg_alignment": 3, "speaker_consistency": 3}
    assert items[4].id == "speaker_consistency/sample_1" and items[4].positive.units == (1, 0, 19)
    assert items[4].negative.units == (1, 1, 19)
    flat = tmp_path / "all.jsonl"
    flat.write_text("".join(json.dumps({"path": k, "units": v}) + "\n" for k, v in flat_keys.items()))
    assert salmon_items(root, str(flat), None) == items  # one table keyed by relative path
    with pytest.raises(BenchmarkError, match=r"its stem 'sample_0_0' names several benchmark files"):
        salmon_items(root, str(per_task["bg_alignment"]), None)  # stems only, shared by both tasks
    (root / "bg_alignment" / "sample_3_0.wav").touch()
    with pytest.raises(BenchmarkError, match=r"bg_alignment: sample 3 has only sample_3_0.wav"):
        salmon_items(root, str(tmp_path / "enc_{task}"), ["bg_alignment"])


def test_blimp_and_storycloze_as_text(tmp_path: Path) -> None:
    blimp = tmp_path / "blimp" / "anaphor_gender_agreement"
    blimp.mkdir(parents=True)
    rows = [
        {"sentence_good": "Katherine can't help herself.", "sentence_bad": "Katherine can't help himself.",
         "field": "morphology", "linguistics_term": "anaphor_agreement", "UID": "anaphor_gender_agreement",
         "simple_LM_method": True, "one_prefix_method": True, "two_prefix_method": False,
         "lexically_identical": False, "pair_id": k}
        for k in range(2)
    ]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows), blimp / "train-00000-of-00001.parquet")
    items = blimp_items(str(tmp_path / "blimp"), "linguistics_term")
    assert [i.id for i in items] == ["anaphor_gender_agreement_0", "anaphor_gender_agreement_1"]
    assert items[0].positive.text == "Katherine can't help herself." and items[0].category == "anaphor_agreement"
    assert blimp_items(str(tmp_path / "blimp"), "UID")[0].category == "anaphor_gender_agreement"
    with pytest.raises(BenchmarkError, match=r"missing column\(s\) \['phenomenon'\]"):
        blimp_items(str(tmp_path / "blimp"), "phenomenon")

    columns = ["InputStoryid", "InputSentence1", "InputSentence2", "InputSentence3", "InputSentence4",
               "RandomFifthSentenceQuiz1", "RandomFifthSentenceQuiz2", "AnswerRightEnding"]  # fmt: skip
    csv_path = write_csv(
        tmp_path / "cloze_test_test__spring2016.csv",
        columns,
        [["b929", "Rick grew up.", "He joined a gang.", "He got shot.", "He was saved.", "He is happy.", "He ran.", 1],
         ["c0ff", "Ann baked.", "She burnt it.", "She cried.", "She tried again.", "It was bad.", "It was good.", 2]],
    )  # fmt: skip
    items = text_items(str(csv_path), "test", None, None)
    assert items[0].prefix.text == "Rick grew up. He joined a gang. He got shot. He was saved."
    assert (items[0].positive.text, items[0].negative.text) == ("He is happy.", "He ran.")
    assert (items[1].positive.text, items[1].negative.text) == ("It was good.", "It was bad.")
    hf = tmp_path / "xstory_cloze_en.jsonl"
    hf_names = ["story_id", "input_sentence_1", "input_sentence_2", "input_sentence_3", "input_sentence_4",
                "sentence_quiz1", "sentence_quiz2", "answer_right_ending"]  # fmt: skip
    hf.write_text(json.dumps(dict(zip(hf_names, ["x1", "a.", "b.", "c.", "d.", "e.", "f.", 2], strict=True))) + "\n")
    (item,) = text_items(str(hf), "eval", None, None)
    assert (item.id, item.prefix.text, item.positive.text) == ("x1", "a. b. c. d.", "f.")


def test_synthetic_negatives_keep_units_and_run_lengths(synthetic_corpus_dir: Path) -> None:
    items = synthetic_items(synthetic_corpus_dir, "test", None, seed=0)
    assert len(items) >= 14 and {i.category for i in items} == {"continuation", "whole utterance"}
    for item in items:
        pos, neg = np.asarray(item.positive.units), np.asarray(item.negative.units)
        assert not np.array_equal(pos, neg)
        assert Counter(pos.tolist()) == Counter(neg.tolist())
        assert sorted(map(len, runs(pos))) == sorted(map(len, runs(neg)))
        prefix = np.asarray(item.prefix.units if item.prefix else [], dtype=np.int64)
        joined = [np.concatenate([prefix, c]) for c in (pos, neg)]
        assert len(runs(joined[0])) == len(runs(joined[1])), "deduplicated, both must keep as many tokens"
    assert all(i.prefix is not None for i in items if i.category == "continuation")
