"""The HF fast-tokenizer files of an extended model (`tokenizer.json`, `tokenizer_config.json`).

DSU characters and modality tokens become added tokens, which transformers and vLLM match before
pre-tokenization: each is one id, exactly as on the tiktoken path (`ssi.vocab.tiktoken`). Pure JSON work,
so the extension script never imports torchtune.
"""

from __future__ import annotations

from typing import Any

from ssi.vocab.layout import (
    DSU_CHAR_OFFSET,
    MODALITY_SPEECH,
    MODALITY_TEXT,
    SpeechVocab,
    VocabError,
    dsu_to_char,
)


def _added_token(token_id: int, content: str, special: bool) -> dict[str, Any]:
    return {
        "id": token_id,
        "content": content,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": special,
    }


def new_added_tokens(vocab: SpeechVocab) -> list[dict[str, Any]]:
    """tokenizer.json `added_tokens` entries for the DSUs and modality tokens of `vocab`."""
    units = range(vocab.n_dsus)
    tokens = [
        _added_token(token_id, dsu_to_char(unit), False)
        for unit, token_id in zip(units, vocab.dsu_ids(units), strict=True)
    ]
    for content, token_id in vocab.modality_token_ids.items():
        tokens.append(_added_token(token_id, content, True))
    return tokens


def check_not_extended(tokenizer_json: dict[str, Any], source: str) -> None:
    """Refuse a tokenizer.json that already has DSU characters or modality tokens."""
    added = [t["content"] for t in tokenizer_json.get("added_tokens", [])]
    if any(t in (MODALITY_TEXT, MODALITY_SPEECH) or (t and t[0] >= chr(DSU_CHAR_OFFSET)) for t in added):
        raise VocabError(f"{source}: already contains DSU or modality tokens (is the input already extended?)")


def check_base_hf_tokenizer(tokenizer_json: dict[str, Any], vocab: SpeechVocab, source: str) -> None:
    """Refuse a tokenizer.json that is not the base of `vocab`: another BPE size, DSU or modality tokens
    already present, or added tokens other than the special-token table the manifest records."""
    model = tokenizer_json.get("model", {})
    if model.get("type") != "BPE" or len(model.get("vocab", {})) != vocab.n_bpe:
        raise VocabError(
            f"{source}: expected a BPE model with {vocab.n_bpe} entries (as in original/tokenizer.model), "
            f"found type={model.get('type')!r} with {len(model.get('vocab', {}))} entries"
        )
    check_not_extended(tokenizer_json, source)
    added = {t["content"]: t["id"] for t in tokenizer_json.get("added_tokens", [])}
    if added != dict(vocab.special_tokens or {}):
        raise VocabError(f"{source}: its added tokens are not the special-token table of the vocabulary")


def extend_hf_tokenizer(
    tokenizer_json: dict[str, Any], tokenizer_config: dict[str, Any], vocab: SpeechVocab
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Return extended copies of tokenizer.json and tokenizer_config.json contents."""
    check_base_hf_tokenizer(tokenizer_json, vocab, "tokenizer.json")
    tokens = new_added_tokens(vocab)
    tokenizer_json = {**tokenizer_json, "added_tokens": [*tokenizer_json["added_tokens"], *tokens]}
    decoder = dict(tokenizer_config.get("added_tokens_decoder", {}))
    for token in tokens:
        decoder[str(token["id"])] = {k: v for k, v in token.items() if k != "id"}
    tokenizer_config = {**tokenizer_config, "added_tokens_decoder": decoder}
    return tokenizer_json, tokenizer_config
