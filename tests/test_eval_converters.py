"""Converters from the published benchmark forms, on small files written here in those forms (nothing is
downloaded): ZeroSpeech 2021 gold files with encoded units (and the submission files scripts/evaluate.py
writes for them), spoken StoryCloze in both layouts, SALMon, BLiMP and StoryCloze as text, the synthetic corpus."""

from __future__ import annotations

import csv
import json
from collections import Counter, defaultdict
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
SYNTACTIC_COLUMNS = ["filename", "type", "subtype", "id", "voice", "transcription", "correct"]


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


@pytest.fixture
def zr2021(tmp_path: Path) -> tuple[Path, Path]:
    """A ZeroSpeech 2021 dataset root (lexical/dev, syntactic/dev gold files) and the units of its wavs."""
    rng = np.random.default_rng(0)
    lexical = []
    for pair_id, (word, frequency) in enumerate([("cat", 0), ("house", 3), ("river", 150)]):
        for voice in ("Alex", "Daniel"):
            lexical.append([f"w{pair_id}{voice}", pair_id, voice, frequency, word, "k a t", 3, 1])
            lexical.append([f"n{pair_id}{voice}", pair_id, voice, "", "", "k o t", 3, 0])
    write_csv(tmp_path / "zr/lexical/dev/gold.csv", LEXICAL_COLUMNS, lexical)
    syntactic = []
    for pair_id in range(2):
        for voice in ("Alex", "Daniel"):
            syntactic.append([f"s{pair_id}{voice}", "anaphor_agreement", "sg", pair_id, voice, "he saw himself", 1])
    for pair_id in range(2):
        for voice in ("Alex", "Daniel"):
            syntactic.append([f"b{pair_id}{voice}", "anaphor_agreement", "sg", pair_id, voice, "he saw herself", 0])
    write_csv(tmp_path / "zr/syntactic/dev/gold.csv", SYNTACTIC_COLUMNS, syntactic)
    stems = [row[0] for row in lexical + syntactic]
    return tmp_path / "zr", encoded_folder(tmp_path / "enc", {s: random_units(rng) for s in stems})


def test_zerospeech_lexical_and_syntactic_items(zr2021: tuple[Path, Path]) -> None:
    dataset, enc = zr2021
    table = UnitsTable(str(enc))
    lexical = lexical_items(dataset, "dev", table)
    assert len(lexical) == 6 and lexical[0].id == "w0Alex>n0Alex"
    assert lexical[0].positive.units == tuple(table.lookup("w0Alex")) and lexical[0].prefix is None
    assert [i.category for i in lexical[::2]] == ["oov", "1-5", ">100"]
    assert lexical[1].zerospeech is not None and lexical[1].zerospeech.pair == "0"
    assert lexical[1].meta is not None and lexical[1].meta["non_word"] == "k o t"  # no written form: phones
    syntactic = syntactic_items(dataset, "dev", table)
    assert [(i.zerospeech.positive, i.zerospeech.negative) for i in syntactic if i.zerospeech] == [
        ("s0Alex", "b0Alex"),
        ("s0Daniel", "b0Daniel"),
        ("s1Alex", "b1Alex"),
        ("s1Daniel", "b1Daniel"),
    ]
    assert {i.category for i in syntactic} == {"anaphor_agreement"}


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
    with pytest.raises(BenchmarkError, match=r"file 'w2Daniel' \(id 2, voice Daniel\) has no partner"):
        lexical_items(dataset, "dev", table)
    write_csv(
        lexical,
        rows[0],
        [*rows[1:], ["w9Alex", 9, "Alex", 1, "x", "x", 1, 1], ["n9Alex", 9, "Alex", "", "", "y", 1, 0]],
    )
    with pytest.raises(BenchmarkError, match=r"no units for 'w9Alex'"):
        lexical_items(dataset, "dev", table)


def official_accuracy(gold: Path, submission: Path, task: str) -> float:
    """The ZR2021 scorers' overall score, re-derived from their documented rules: pairs (lexical: same id and
    voice; syntactic: by position), 1 / 0.5 / 0 per pair, mean over voices per pair key, mean over keys."""
    scores = {}
    for line in submission.read_text().splitlines():
        fields = line.split(" ")
        assert len(fields) == 2, line
        scores[fields[0]] = float(fields[1])
    rows = list(csv.DictReader(gold.open()))
    assert set(scores) == {r["filename"] for r in rows}, "the submission must list exactly the gold files"
    good, bad = [r for r in rows if r["correct"] == "1"], [r for r in rows if r["correct"] == "0"]
    if task == "lexical":
        by_key = {(r["id"], r["voice"]): r for r in bad}
        pairs = [(g, by_key[(g["id"], g["voice"])]) for g in good]
        key = lambda r: r["id"]  # noqa: E731
    else:
        pairs = list(zip(good, bad, strict=True))
        key = lambda r: (r["type"], r["subtype"], r["id"])  # noqa: E731
    per_key = defaultdict(list)
    for g, b in pairs:
        s, t = scores[g["filename"]], scores[b["filename"]]
        per_key[key(g)].append(1.0 if s > t else 0.5 if s == t else 0.0)
    return float(np.mean([np.mean(v) for v in per_key.values()]))


def test_zerospeech_submission_files_match_the_gold_set(
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
        official = official_accuracy(dataset / task / "dev" / "gold.csv", submission, task)
        assert summary["zerospeech"][f"{task}/dev"]["accuracy"] == pytest.approx(official)
        assert summary["n"] == len(read_items(items))


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
