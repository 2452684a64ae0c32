"""The base model's own special-token table, read from its files and checked across them.

Llama 3 releases share one 128,000-rank BPE vocabulary but name the 256 special tokens after it
differently: Llama 3.0 has `<|reserved_special_token_0..4|>` where 3.1-3.3 have `<|finetune_right_pad_id|>`,
`<|eom_id|>` and `<|python_tag|>`; the llama-models tables call id B+5 `<|step_id|>`. So the table is
never assumed: it is read from `tokenizer.json` (its added tokens), checked against
`tokenizer_config.json` (`added_tokens_decoder`) and against the rank count of `original/tokenizer.model`
(the block must start right after the BPE ranks and have no gap), and recorded in `ssi.json`. Every tool
then looks special and stop ids up by name (docs/vocabulary.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ssi.files import FileFormatError, read_json

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
# The chat format every Llama 3 release uses (torchtune's tokenize_messages needs all of them).
REQUIRED = (BOS, EOS, "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
# Generation stops on whichever of these the base has.
STOP_NAMES = (EOS, "<|eot_id|>", "<|eom_id|>")
# Padding uses the first of these the base has (3.0 has no dedicated pad token; padding is never attended
# to or trained on, so its id only has to be a valid special).
PAD_NAMES = ("<|finetune_right_pad_id|>", EOS)


class SpecialTokenError(ValueError):
    """A base whose special tokens are missing, inconsistent between its files, or not where Llama 3 puts them."""


def _added_tokens(tokenizer_json: Mapping[str, Any], source: str) -> dict[str, int]:
    table: dict[str, int] = {}
    by_id: dict[int, str] = {}
    for token in tokenizer_json.get("added_tokens", []):
        name, token_id = token.get("content"), token.get("id")
        if not isinstance(name, str) or not isinstance(token_id, int):
            raise SpecialTokenError(f"{source}: added token {token!r} has no string content and integer id")
        if name in table:
            raise SpecialTokenError(f"{source}: {name} is listed twice, with ids {table[name]} and {token_id}")
        if token_id in by_id:
            raise SpecialTokenError(f"{source}: id {token_id} is given to both {by_id[token_id]} and {name}")
        table[name], by_id[token_id] = token_id, name
    return table


def check_files_agree(
    from_tokenizer: Mapping[str, int], tokenizer_config: Mapping[str, Any], source: str = "tokenizer_config.json"
) -> None:
    """Refuse a `tokenizer_config.json` whose `added_tokens_decoder` disagrees with `tokenizer.json`."""
    decoder = tokenizer_config.get("added_tokens_decoder")
    if decoder is None:
        return  # older files carry the table in tokenizer.json only
    from_config = {entry.get("content"): int(token_id) for token_id, entry in decoder.items()}
    for name, token_id in from_tokenizer.items():
        if name not in from_config:
            raise SpecialTokenError(f"{name} has id {token_id} in tokenizer.json but is missing from {source}")
        if from_config[name] != token_id:
            raise SpecialTokenError(
                f"{name} has id {token_id} in tokenizer.json but id {from_config[name]} in {source}"
            )
    for name, token_id in from_config.items():
        if name not in from_tokenizer:
            raise SpecialTokenError(f"{name} has id {token_id} in {source} but is missing from tokenizer.json")


def check_block(table: Mapping[str, int], n_bpe: int, source: str) -> dict[str, int]:
    """The table in id order, after checking that it is one contiguous block starting at `n_bpe` (right
    after the BPE ranks) and holds the tokens of the Llama 3 chat format."""
    ordered = dict(sorted(table.items(), key=lambda item: item[1]))
    for offset, (name, token_id) in enumerate(ordered.items()):
        if token_id != n_bpe + offset:
            where = "right after the BPE ranks" if offset == 0 else f"after {list(ordered)[offset - 1]}"
            raise SpecialTokenError(
                f"{source}: special token {name} has id {token_id}, expected {n_bpe + offset} ({where}: the special "
                f"tokens must be one contiguous block after the {n_bpe} ranks of original/tokenizer.model)"
            )
    missing = [name for name in REQUIRED if name not in ordered]
    if missing:
        raise SpecialTokenError(f"{source}: no {', '.join(missing)}: not a Llama 3 tokenizer (chat format tokens)")
    return ordered


def special_tokens_of(
    tokenizer_json: Mapping[str, Any],
    tokenizer_config: Mapping[str, Any],
    n_bpe: int,
    source: str,
    *,
    limit: int | None = None,
) -> dict[str, int]:
    """name -> id of the special tokens in a tokenizer.json, in id order, checked against tokenizer_config.json.

    `limit`: only ids below it (an extended directory's tokenizer.json also lists DSU and modality tokens
    after the special block)."""
    table = _added_tokens(tokenizer_json, f"{source}/tokenizer.json")
    if limit is not None:
        table = {name: token_id for name, token_id in table.items() if token_id < limit}
        decoder = tokenizer_config.get("added_tokens_decoder")
        if decoder is not None:
            decoder = {k: v for k, v in decoder.items() if int(k) < limit}
            tokenizer_config = {**tokenizer_config, "added_tokens_decoder": decoder}
    check_files_agree(table, tokenizer_config, f"{source}/tokenizer_config.json")
    return check_block(table, n_bpe, f"{source}/tokenizer.json")


def read_special_tokens(model_dir: Path, n_bpe: int, *, limit: int | None = None) -> dict[str, int]:
    """`special_tokens_of` a model directory's tokenizer files."""
    model_dir = Path(model_dir)
    try:
        tokenizer_json = read_json(model_dir / "tokenizer.json")
        config_path = model_dir / "tokenizer_config.json"
        tokenizer_config = read_json(config_path) if config_path.is_file() else {}
    except FileFormatError as err:
        raise SpecialTokenError(str(err)) from None
    return special_tokens_of(tokenizer_json, tokenizer_config, n_bpe, str(model_dir), limit=limit)


def stop_names(table: Mapping[str, int]) -> list[str]:
    return [name for name in STOP_NAMES if name in table]


def pad_name(table: Mapping[str, int]) -> str:
    return next(name for name in PAD_NAMES if name in table)
