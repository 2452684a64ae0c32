"""BLiMP (nyu-mll/blimp: 67 paradigms of 1,000 minimal pairs) as text items: `sentence_good` is the positive,
`sentence_bad` the negative, no prefix; the category is a column (`linguistics_term` by default: the
12 phenomena; `UID` gives the 67 paradigms)."""

from __future__ import annotations

from typing import Any

from ssi.eval.converters.rows import hub_rows, local_files, need_columns, read_file
from ssi.eval.items import BenchmarkError, Item, Segment

COLUMNS = ("sentence_good", "sentence_bad", "UID", "pair_id")


def blimp_rows(source: str, revision: str | None) -> list[dict[str, Any]]:
    files = local_files(source)
    if files is not None:
        return [row for f in files for row in read_file(f)]
    import datasets

    configs = datasets.get_dataset_config_names(source, revision=revision)
    return [row for config in configs for row in hub_rows(source, config, "train", revision)]


def blimp_items(source: str, category: str, revision: str | None = None) -> list[Item]:
    rows = blimp_rows(source, revision)
    if not rows:
        raise BenchmarkError(f"{source}: no rows")
    need_columns(rows[0], (*COLUMNS, category), source)
    return [
        Item(
            id=f"{row['UID']}_{row['pair_id']}",
            positive=Segment(text=str(row["sentence_good"])),
            negative=Segment(text=str(row["sentence_bad"])),
            category=str(row[category]),
        )
        for row in rows
    ]
