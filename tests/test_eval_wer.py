"""WER scoring (ssi.eval, scripts/wer.py): jiwer-equal counts, id matching, normalisers, outputs and every error."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import jiwer
import pytest

from ssi.eval import wer as metrics
from ssi.eval.references import load_references, read_generations
from ssi.eval.scoring import PER_UTTERANCE_JSONL, WER_JSON, score_generations
from ssi.eval.wer import WerInputError, compute_wer, get_normalizer, normalize_texts
from ssi.run_dir import OutputLocation as RunLocation
from ssi.run_dir import locate_generations as infer_run_location

REPO = Path(__file__).resolve().parents[1]

# (reference, hypothesis, substitutions, deletions, insertions, hits), counted by hand.
HAND_CASES = [
    ("the cat sat on the mat", "the cat sat on the mat", 0, 0, 0, 6),
    ("the cat sat on the mat", "the cat sat on a mat", 1, 0, 0, 5),
    ("the cat sat on the mat", "the cat on the mat", 0, 1, 0, 5),
    ("the cat sat on the mat", "the big cat sat on the mat today", 0, 0, 2, 6),
    ("a b c d", "a x c d e", 1, 0, 1, 3),
    ("one two three", "", 0, 3, 0, 0),
    ("one two three", "four five six seven", 3, 0, 1, 0),
    ("a b a b a b", "b a b a b a", 0, 1, 1, 5),
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_layout(tmp_path: Path, dataset: str = "mls_hubert", split: str = "test") -> Path:
    """Where generate.py writes (docs/run_directory.md)."""
    return tmp_path / "run" / "generations" / "epoch_2" / "global_step_300" / dataset / split / "generations.jsonl"


def outputs(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name != path.name)


# --- counts ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("ref", "hyp", "subs", "dels", "ins", "hits"), HAND_CASES)
def test_hand_made_counts_match_hand_and_jiwer(ref: str, hyp: str, subs: int, dels: int, ins: int, hits: int) -> None:
    result = compute_wer(["u"], [ref], [hyp], normalizer="none", progress=False)
    u = result.utterances[0]
    assert (u.substitutions, u.deletions, u.insertions, u.hits) == (subs, dels, ins, hits)
    expected = jiwer.process_words(ref, hyp)
    assert (u.substitutions, u.deletions, u.insertions, u.hits) == (
        expected.substitutions,
        expected.deletions,
        expected.insertions,
        expected.hits,
    )
    assert result.wer == pytest.approx(expected.wer, abs=0, rel=1e-15)
    assert u.wer == (subs + dels + ins) / (subs + dels + hits)


def test_corpus_wer_equals_one_jiwer_call_on_hand_cases() -> None:
    refs = [c[0] for c in HAND_CASES]
    hyps = [c[1] for c in HAND_CASES]
    result = compute_wer([str(i) for i in range(len(refs))], refs, hyps, normalizer="none", progress=False)
    expected = jiwer.process_words(refs, hyps)
    assert result.wer == expected.wer
    assert (result.substitutions, result.deletions, result.insertions, result.hits) == (
        expected.substitutions,
        expected.deletions,
        expected.insertions,
        expected.hits,
    )
    # S=5 D=5 I=5 over N=S+D+H=5+5+30=40 reference words.
    assert (result.substitutions, result.deletions, result.insertions, result.hits) == (5, 5, 5, 30)
    assert result.wer == 15 / 40
    assert result.reference_words == sum(len(r.split()) for r in refs)
    assert result.hypothesis_words == sum(len(h.split()) for h in hyps)


def test_evaluate_wer_documented_example() -> None:
    """The example in the docstring of Hugging Face evaluate's "wer" metric, which documents 0.5."""
    predictions = ["this is the prediction", "there is an other sample"]
    references = ["this is the reference", "there is another one"]
    assert compute_wer(["1", "2"], references, predictions, normalizer="none", progress=False).wer == 0.5


def test_random_pairs_match_jiwer_per_utterance() -> None:
    """Short and >64-word utterances (rapidfuzz switches algorithms there), tiny vocabulary, empty sides."""
    rng = random.Random(7)
    vocab = ["a", "b", "c", "d", "e", "f"]
    refs, hyps = [], []
    for _ in range(400):
        ref = rng.choices(vocab, k=rng.choice([0, 1, 3, 10, 40, 70, 150]))
        hyp = [w if rng.random() > 0.3 else rng.choice(vocab) for w in ref if rng.random() > 0.15]
        hyp[rng.randint(0, len(hyp)) : 0] = rng.choices(vocab, k=rng.randint(0, 4))
        refs.append(" ".join(ref))
        hyps.append(" ".join(hyp))
    refs[0] = "a b"  # at least one non-empty reference
    result = compute_wer([str(i) for i in range(len(refs))], refs, hyps, normalizer="none", progress=False)
    for u, ref, hyp in zip(result.utterances, refs, hyps, strict=True):
        exp = jiwer.process_words(ref, hyp)
        assert (u.substitutions, u.deletions, u.insertions, u.hits) == (
            exp.substitutions,
            exp.deletions,
            exp.insertions,
            exp.hits,
        ), (ref, hyp)
    assert result.wer == jiwer.process_words(refs, hyps).wer


# --- normalisers -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        (
            "whisper",
            "Mr. Smith paid $20.50 for TWENTY-ONE apples, didn't he?",
            "mister smith paid $20.50 for 21 apples did not he",
        ),
        ("whisper", "Colour  and   behaviour!", "color and behavior"),
        ("whisper", "Hmm, uh, OK.", "ok"),
        ("whisper", "It's the 1st of May", "it is the 1st of may"),
        ("basic", "Mr. Smith paid $20.50, didn't he?", "mr smith paid 20 50 didn t he"),
        ("basic", "TWENTY-ONE Colour", "twenty one colour"),
        ("none", "Mr. Smith, TWENTY-ONE!", "Mr. Smith, TWENTY-ONE!"),
    ],
)
def test_normalizers_on_known_strings(name: str, text: str, expected: str) -> None:
    assert " ".join(get_normalizer(name)(text).split()) == expected


def test_normalizer_changes_wer_as_expected() -> None:
    refs, hyps = ["Hello, World! It's 21 degrees."], ["hello world it is twenty one degrees"]
    assert compute_wer(["u"], refs, hyps, normalizer="whisper", progress=False).wer == 0
    assert compute_wer(["u"], refs, hyps, normalizer="none", progress=False).wer == 7 / 5
    # basic lowercases and drops punctuation but neither expands contractions nor converts numbers.
    basic = compute_wer(["u"], refs, hyps, normalizer="basic", progress=False)
    assert basic.utterances[0].reference == "hello world it s 21 degrees"
    u = basic.utterances[0]
    assert (u.substitutions, u.deletions, u.insertions, u.hits) == (2, 0, 1, 4)  # s->is, 21->twenty, +one
    assert basic.wer == 3 / 6


def test_unknown_normalizer_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown normalizer 'english'"):
        get_normalizer("english")


def test_parallel_normalisation_equals_serial(monkeypatch: pytest.MonkeyPatch) -> None:
    """Real worker processes on a small input (thresholds lowered), same output in the same order."""
    monkeypatch.setattr(metrics, "_PARALLEL_MIN_STRINGS", 10)
    monkeypatch.setattr(metrics, "_PARALLEL_CHUNK", 7)
    texts = [f"Mr. Smith bought {i} apples, didn't he?" for i in range(40)] + ["Colour!"] * 5
    serial = normalize_texts(texts, "whisper", workers=1, progress=False)
    assert normalize_texts(texts, "whisper", workers=2, progress=False) == serial
    assert serial[3] == "mister smith bought 3 apples did not he"
    assert serial[-1] == "color"


# --- path layout -----------------------------------------------------------------------------------


def test_infer_run_location(tmp_path: Path) -> None:
    assert infer_run_location(run_layout(tmp_path, "mls_hubert", "dev")) == RunLocation(2, 300, "mls_hubert", "dev")
    assert infer_run_location(tmp_path / "somewhere" / "generations.jsonl") is None
    assert infer_run_location(tmp_path / "epoch_x" / "global_step_3" / "d" / "s" / "generations.jsonl") is None


def test_wer_json_records_inferred_and_explicit_location(tmp_path: Path) -> None:
    path = write_jsonl(run_layout(tmp_path), [{"id": "a", "text": "hello there", "reference": "hello world"}])
    summary = score_generations(path, progress=False)
    written = json.loads((path.parent / WER_JSON).read_text())
    assert written == summary
    assert (written["dataset"], written["split"], written["epoch"], written["global_step"]) == (
        "mls_hubert",
        "test",
        2,
        300,
    )
    assert written["wer"] == 0.5 and written["substitutions"] == 1 and written["hits"] == 1
    assert written["n_utterances"] == 1 and written["n_reference_words"] == 2
    assert written["normalizer"] == "whisper"
    assert written["generations"] == str(path.absolute())
    summary = score_generations(path, dataset="other", split="dev", overwrite=True, progress=False)
    assert (summary["dataset"], summary["split"]) == ("other", "dev")
    elsewhere = write_jsonl(tmp_path / "loose" / "generations.jsonl", [{"id": "a", "text": "x", "reference": "x"}])
    assert score_generations(elsewhere, progress=False)["dataset"] is None


# --- references and id matching --------------------------------------------------------------------

UTTERANCES = {
    "spk1-0001": ("the cat sat on the mat", "the cat sat on a mat"),
    "spk1-0002": ("hello world", "hello world"),
    "spk2-0001": ("one two three four", "one three four five"),
    "spk2-0002": ("speech units are discrete", "speech units discrete"),
    "spk3-0001": ("good morning", "good evening everyone"),
}


def expected_by_id() -> dict[str, tuple[int, int, int, int]]:
    out = {}
    for uid, (ref, hyp) in UTTERANCES.items():
        exp = jiwer.process_words(ref, hyp)
        out[uid] = (exp.substitutions, exp.deletions, exp.insertions, exp.hits)
    return out


def shuffled_generations(path: Path, with_reference: bool, seed: int = 3) -> Path:
    rows = [
        {"id": uid, "text": hyp, **({"reference": ref} if with_reference else {}), "output_token_ids": [1, 2]}
        for uid, (ref, hyp) in UTTERANCES.items()
    ]
    random.Random(seed).shuffle(rows)
    return write_jsonl(path, rows)


def per_utterance_counts(path: Path) -> dict[str, tuple[int, int, int, int]]:
    rows = [json.loads(line) for line in (path.parent / PER_UTTERANCE_JSONL).read_text().splitlines()]
    return {r["id"]: (r["substitutions"], r["deletions"], r["insertions"], r["hits"]) for r in rows}


def corpus_wer() -> float:
    refs, hyps = zip(*UTTERANCES.values(), strict=True)
    return jiwer.process_words(list(refs), list(hyps)).wer


def test_shuffled_lines_with_reference_field_match_by_id(tmp_path: Path) -> None:
    path = shuffled_generations(tmp_path / "g" / "generations.jsonl", with_reference=True)
    summary = score_generations(path, per_utterance=True, normalizer="none", progress=False)
    assert summary["wer"] == corpus_wer()
    assert per_utterance_counts(path) == expected_by_id()


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_reference_file_matched_by_id_not_line_order(tmp_path: Path, fmt: str) -> None:
    import datasets

    path = shuffled_generations(tmp_path / "g" / "generations.jsonl", with_reference=False, seed=1)
    rows = [{"ID": uid, "transcript": ref, "speech_tokens": [5, 6, 7]} for uid, (ref, _) in UTTERANCES.items()]
    rows.reverse()
    ref_file = tmp_path / f"refs.{fmt}"
    if fmt == "jsonl":
        write_jsonl(ref_file, rows)
    else:
        datasets.Dataset.from_list(rows).to_parquet(str(ref_file))
    summary = score_generations(path, references=ref_file, normalizer="none", per_utterance=True, progress=False)
    assert summary["wer"] == corpus_wer()
    assert summary["references"] == str(ref_file.absolute())
    assert per_utterance_counts(path) == expected_by_id()


def test_reference_glob_custom_columns_and_int_ids(tmp_path: Path) -> None:
    items = list(UTTERANCES.values())
    write_jsonl(tmp_path / "refs" / "part-0.jsonl", [{"key": i, "sentence": r} for i, (r, _) in enumerate(items[:3])])
    write_jsonl(
        tmp_path / "refs" / "part-1.jsonl", [{"key": i + 3, "sentence": r} for i, (r, _) in enumerate(items[3:])]
    )
    refs = load_references(str(tmp_path / "refs" / "*.jsonl"), id_column="key", text_column="sentence")
    assert refs == {str(i): r for i, (r, _) in enumerate(items)}


def save_dataset_dict(folder: Path) -> None:
    import datasets

    def split(ids: list[str]) -> datasets.Dataset:
        return datasets.Dataset.from_dict(
            {
                "ID": ids,
                "transcript": [UTTERANCES[i][0] for i in ids],
                "tokenized": [UTTERANCES[i][0].split() for i in ids],
                "speech_tokens": [[1, 2, 3] for _ in ids],
            }
        )

    ids = list(UTTERANCES)
    datasets.DatasetDict({"train": split(ids[:2]), "test": split(ids)}).save_to_disk(str(folder))


def test_save_to_disk_references_use_split_from_layout(tmp_path: Path) -> None:
    folder = tmp_path / "mls_dsus"
    save_dataset_dict(folder)
    path = shuffled_generations(run_layout(tmp_path, split="test"), with_reference=False)
    summary = score_generations(path, references=folder, normalizer="none", progress=False)
    assert summary["wer"] == corpus_wer()
    assert summary["split"] == "test"

    loose = shuffled_generations(tmp_path / "loose" / "generations.jsonl", with_reference=False)
    with pytest.raises(WerInputError, match=r"has splits \['test', 'train'\]; choose one with --split"):
        score_generations(loose, references=folder, progress=False)
    with pytest.raises(WerInputError, match=r"has no split 'dev'; available: \['test', 'train'\]"):
        score_generations(loose, references=folder, split="dev", progress=False)
    assert outputs(loose) == []


def test_local_data_folder_goes_through_load_dataset(tmp_path: Path) -> None:
    """The hub-id code path (`datasets.load_dataset`), exercised on a local folder of parquet files."""
    import datasets

    folder = tmp_path / "hub_like"
    (folder / "data").mkdir(parents=True)
    rows = [{"ID": uid, "transcript": ref} for uid, (ref, _) in UTTERANCES.items()]
    datasets.Dataset.from_list(rows).to_parquet(str(folder / "data" / "test-00000-of-00001.parquet"))
    path = shuffled_generations(tmp_path / "g" / "generations.jsonl", with_reference=False)
    summary = score_generations(path, references=folder, split="test", normalizer="none", progress=False)
    assert summary["wer"] == corpus_wer()
    with pytest.raises(WerInputError, match=r"cannot load references from .*hub_like.* \(split 'validation'\)"):
        score_generations(path, references=folder, split="validation", overwrite=True, progress=False)


# --- outputs ---------------------------------------------------------------------------------------


def test_per_utterance_sorted_worst_first(tmp_path: Path) -> None:
    rows = [
        {"id": "ok", "text": "hello world", "reference": "hello world"},
        {"id": "half", "text": "hello there", "reference": "hello world"},
        {"id": "filler", "text": "extra words", "reference": "uh"},  # reference empty after whisper
        {"id": "bad", "text": "nothing alike", "reference": "hello world"},
        {"id": "worse", "text": "a b c d", "reference": "x y"},
    ]
    path = write_jsonl(tmp_path / "g" / "generations.jsonl", rows)
    summary = score_generations(path, per_utterance=True, progress=False)
    lines = [json.loads(x) for x in (path.parent / PER_UTTERANCE_JSONL).read_text().splitlines()]
    assert [r["id"] for r in lines] == ["filler", "worse", "bad", "half", "ok"]
    assert lines[0]["wer"] is None and lines[0]["insertions"] == 2 and lines[0]["reference"] == ""
    assert lines[1]["wer"] == 2.0 and lines[1]["errors"] == 4 and lines[1]["reference_words"] == 2
    assert summary["per_utterance"] == str((path.parent / PER_UTTERANCE_JSONL).absolute())
    assert summary["wer"] == (2 + 4 + 2 + 1) / 8
    assert outputs(path) == sorted([PER_UTTERANCE_JSONL, WER_JSON])


def test_refuses_to_overwrite_without_flag(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "g" / "generations.jsonl", [{"id": "a", "text": "a b", "reference": "a b"}])
    score_generations(path, per_utterance=True, progress=False)
    (path.parent / WER_JSON).write_text("keep me")
    with pytest.raises(FileExistsError, match=rf"{WER_JSON} already exists; pass --overwrite"):
        score_generations(path, progress=False)
    assert (path.parent / WER_JSON).read_text() == "keep me"
    (path.parent / WER_JSON).unlink()
    with pytest.raises(FileExistsError, match=rf"{PER_UTTERANCE_JSONL} already exists"):
        score_generations(path, per_utterance=True, progress=False)
    assert not (path.parent / WER_JSON).exists()
    score_generations(path, per_utterance=True, overwrite=True, progress=False)
    assert json.loads((path.parent / WER_JSON).read_text())["wer"] == 0
    assert outputs(path) == sorted([PER_UTTERANCE_JSONL, WER_JSON])  # no temporary files left behind


# --- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (
            ['{"id": "a", "text": "x", "reference": "x"}', '{"id": "b", "text": '],
            r"generations.jsonl:2: malformed JSON",
        ),
        (['{"id": "a", "text": "x", "reference": "x"}', "[1, 2]"], r"generations.jsonl:2: expected a JSON object"),
        (['{"text": "x", "reference": "x"}'], r"generations.jsonl:1: missing 'id'"),
        (['{"id": "a", "reference": "x"}'], r"generations.jsonl:1 \(id 'a'\): missing 'text'"),
        (['{"id": "a", "text": null, "reference": "x"}'], r"generations.jsonl:1 \(id 'a'\): 'text' is NoneType"),
        (['{"id": "", "text": "x"}'], r"generations.jsonl:1: id '' is not a non-empty string"),
        (
            ['{"id": "a", "text": "x", "reference": "x"}', "", '{"id": "a", "text": "y", "reference": "y"}'],
            r"generations.jsonl:3 \(id 'a'\): duplicate id, first seen on line 1",
        ),
        ([], r"generations.jsonl holds no generations"),
        (['{"id": "a", "text": "x"}'], r"empty reference set: no line of .* has a 'reference'"),
        (['{"id": "a", "text": "x", "reference": "uh"}'], r"empty reference set: all 1 references are empty after"),
    ],
)
def test_bad_generations_name_line_or_id_and_write_nothing(tmp_path: Path, lines: list[str], message: str) -> None:
    path = tmp_path / "g" / "generations.jsonl"
    path.parent.mkdir()
    path.write_text("".join(line + "\n" for line in lines))
    with pytest.raises(WerInputError, match=message):
        score_generations(path, per_utterance=True, progress=False)
    assert outputs(path) == []


def test_non_utf8_line_is_named(tmp_path: Path) -> None:
    path = tmp_path / "g" / "generations.jsonl"
    path.parent.mkdir()
    path.write_bytes(b'{"id": "a", "text": "x", "reference": "x"}\n{"id": "b", "text": "caf\xe9"}\n')
    with pytest.raises(WerInputError, match=r"generations.jsonl:2: not UTF-8"):
        score_generations(path, progress=False)
    assert outputs(path) == []


def test_missing_partners_are_counted_and_refused_unless_allowed(tmp_path: Path) -> None:
    path = shuffled_generations(tmp_path / "g" / "generations.jsonl", with_reference=False)
    with open(path, "a") as f:
        f.write(json.dumps({"id": "extra-hyp", "text": "stray"}) + "\n")
    refs = [{"id": uid, "transcript": ref} for uid, (ref, _) in list(UTTERANCES.items())[1:]]
    refs += [{"id": "extra-ref-1", "transcript": "x"}, {"id": "extra-ref-2", "transcript": "y"}]
    ref_file = write_jsonl(tmp_path / "refs.jsonl", refs)
    with pytest.raises(WerInputError) as err:
        score_generations(path, references=ref_file, progress=False)
    message = str(err.value)
    assert "2 hypotheses in" in message and "have no reference (ids 'spk1-0001', 'extra-hyp')" in message
    assert "2 references from" in message and "have no hypothesis (ids 'extra-ref-1', 'extra-ref-2')" in message
    assert "pass --allow-missing" in message
    assert outputs(path) == []

    summary = score_generations(path, references=ref_file, allow_missing=True, normalizer="none", progress=False)
    assert summary["n_utterances"] == len(UTTERANCES) - 1
    assert summary["n_hypotheses_without_reference"] == 2
    assert summary["n_references_without_hypothesis"] == 2
    refs_scored, hyps_scored = zip(*list(UTTERANCES.values())[1:], strict=True)
    assert summary["wer"] == jiwer.process_words(list(refs_scored), list(hyps_scored)).wer


def test_no_overlap_is_an_empty_reference_set_even_with_allow_missing(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "g" / "generations.jsonl", [{"id": "a", "text": "x"}])
    ref_file = write_jsonl(tmp_path / "refs.jsonl", [{"ID": "b", "transcript": "x"}])
    with pytest.raises(WerInputError, match=r"empty reference set: no id of .* has a reference in"):
        score_generations(path, references=ref_file, allow_missing=True, progress=False)
    assert outputs(path) == []


@pytest.mark.parametrize(
    ("rows", "kwargs", "message"),
    [
        (
            [{"ID": "a", "text": "x"}],
            {},
            r"refs.jsonl:1: missing column\(s\) \['transcript'\]; available: \['ID', 'text'\]",
        ),
        ([{"key": "a", "transcript": "x"}], {}, r"refs.jsonl:1: no id column: none of \['ID', 'id'\]"),
        (
            [{"ID": "a", "transcript": "x"}, {"ID": "a", "transcript": "y"}],
            {},
            r"refs.jsonl:2: duplicate reference id 'a'",
        ),
        ([{"ID": "a", "transcript": 3}], {}, r"refs.jsonl:1 \(id 'a'\): 'transcript' is int, expected a string"),
        ([], {}, r"refs.jsonl holds no references"),
        ([{"ID": "a", "transcript": "x"}], {"id_column": "utt"}, r"missing column\(s\) \['utt'\]"),
    ],
)
def test_bad_reference_files(tmp_path: Path, rows: list[dict], kwargs: dict, message: str) -> None:
    ref_file = write_jsonl(tmp_path / "refs.jsonl", rows)
    with pytest.raises(WerInputError, match=message):
        load_references(ref_file, **kwargs)


def test_bad_parquet_reference_names_file_and_columns(tmp_path: Path) -> None:
    import datasets

    ref_file = tmp_path / "refs.parquet"
    datasets.Dataset.from_list([{"ID": "a", "ID2": "a"}, {"ID": "a", "ID2": "b"}]).to_parquet(str(ref_file))
    with pytest.raises(WerInputError, match=r"refs.parquet: missing column\(s\) \['transcript'\]; available"):
        load_references(ref_file)
    with pytest.raises(WerInputError, match=r"refs.parquet, row 1: duplicate reference id 'a'"):
        load_references(ref_file, text_column="ID2")


def test_missing_reference_sources(tmp_path: Path) -> None:
    with pytest.raises(WerInputError, match=r"reference file .*nope.jsonl does not exist"):
        load_references(tmp_path / "nope.jsonl")
    with pytest.raises(WerInputError, match=r"no files match .*\*.parquet"):
        load_references(str(tmp_path / "*.parquet"))
    (tmp_path / "refs.csv").write_text("ID,transcript\na,x\n")
    with pytest.raises(WerInputError, match=r"refs.csv: unsupported reference file type"):
        load_references(tmp_path / "refs.csv")
    with pytest.raises(WerInputError, match=r"is not a file \(expected a generations.jsonl\)"):
        read_generations(tmp_path / "generations.jsonl")


# --- command line ----------------------------------------------------------------------------------


def test_cli_end_to_end(tmp_path: Path) -> None:
    path = shuffled_generations(run_layout(tmp_path), with_reference=True)
    cmd = [sys.executable, str(REPO / "scripts" / "wer.py"), str(path), "--per-utterance", "--no-progress"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    summary = json.loads((path.parent / WER_JSON).read_text())
    assert done.stdout.startswith(f"WER {100 * summary['wer']:.2f}% on mls_hubert/test ({len(UTTERANCES)} utterances")
    assert str(path.parent / WER_JSON) in done.stdout
    assert (path.parent / PER_UTTERANCE_JSONL).is_file()

    again = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert again.returncode == 2
    assert f"error: {path.parent / WER_JSON} already exists; pass --overwrite" in again.stderr

    bad = write_jsonl(tmp_path / "bad" / "generations.jsonl", [{"id": "a", "text": "x"}, {"id": "a", "text": "y"}])
    broken = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "wer.py"), str(bad), "--normalizer", "basic"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert broken.returncode == 2
    assert "generations.jsonl:2 (id 'a'): duplicate id, first seen on line 1" in broken.stderr
    assert outputs(bad) == []


def test_lines_without_reference_field_are_counted(tmp_path: Path) -> None:
    rows = [
        {"id": "a", "text": "hello world", "reference": "hello world"},
        {"id": "b", "text": "no reference here"},
        {"id": "c", "text": "good day", "reference": "good night", "finish_reason": "stop"},
    ]
    path = write_jsonl(tmp_path / "g" / "generations.jsonl", rows)
    with pytest.raises(WerInputError, match=r"1 hypotheses in .* have no reference \(ids 'b'\) and 0 references"):
        score_generations(path, progress=False)
    assert outputs(path) == []
    summary = score_generations(path, allow_missing=True, progress=False)
    assert (summary["n_utterances"], summary["n_hypotheses_without_reference"], summary["wer"]) == (2, 1, 1 / 4)


def test_references_option_overrides_reference_fields(tmp_path: Path) -> None:
    rows = [{"id": "a", "text": "hello world", "reference": "stale text"}]
    path = write_jsonl(tmp_path / "g" / "generations.jsonl", rows)
    ref_file = write_jsonl(tmp_path / "refs.jsonl", [{"ID": "a", "transcript": "hello world"}])
    summary = score_generations(path, references=ref_file, progress=False)
    assert summary["wer"] == 0 and summary["references"] == str(ref_file.absolute())


def test_stale_per_utterance_file_is_flagged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_jsonl(tmp_path / "g" / "generations.jsonl", [{"id": "a", "text": "a", "reference": "a"}])
    score_generations(path, per_utterance=True, progress=False)
    with caplog.at_level("WARNING", logger="ssi.eval.scoring"):
        summary = score_generations(path, overwrite=True, progress=False)
    assert summary["per_utterance"] is None
    assert f"{PER_UTTERANCE_JSONL} is from an earlier scoring" in caplog.text
