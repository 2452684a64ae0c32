"""The tiktoken path of the extended vocabulary (torchtune), twin of `ssi.vocab.hf_tokenizer`.

`SpeechLlama3Tokenizer` is torchtune's Llama 3 tokenizer (chat format, masking, truncation are
inherited) taught the extended layout of `ssi.vocab.layout`: each DSU character and each modality token
is one id, computed directly instead of going through BPE. `ssi.vocab.hf_tokenizer` adds the same tokens
to `tokenizer.json` for transformers and vLLM, so both paths give identical ids for any string.
"""

from __future__ import annotations

import re
from pathlib import Path

from torchtune.data import PromptTemplate
from torchtune.models.llama3._tokenizer import CL100K_PATTERN, Llama3Tokenizer
from torchtune.modules.transforms.tokenizers import TikTokenBaseTokenizer

from ssi.hf_dir import TIKTOKEN_FILE
from ssi.vocab import specials
from ssi.vocab.layout import DSU_CHAR_OFFSET, MAX_DSUS, SpeechVocab, VocabError, count_bpe_ranks, dsu_to_char

_DSU_CLASS = f"[{chr(DSU_CHAR_OFFSET)}-{chr(DSU_CHAR_OFFSET + MAX_DSUS - 1)}]"
# Everything that may be a single added token: Llama special strings, modality tokens, DSU runs.
# Candidates that are not tokens of this vocabulary stay plain text.
_ADDED_TOKEN_PATTERN = re.compile(rf"<\|[a-z0-9_]+\|>|<extra_id_MM_(?:TEXT|SPEECH)>|{_DSU_CLASS}+")


# One position of an utterance's audio span in a features-method prompt (ssi.data.audio_sft): never a token of any
# vocabulary, so it cannot be confused with one; the method writes projected speech features there before the
# decoder reads the position (ssi.model.methods.features).
AUDIO_SLOT = -1


class SpeechLlama3Tokenizer(Llama3Tokenizer):
    """Llama 3 tiktoken tokenizer over an extended vocabulary, or over a base vocabulary given its
    special-token table (`special_tokens`, read from the base's files by `load_base_tokenizer`).

    Special-token strings in text are encoded as their special ids, as the HF tokenizer does, so the
    two paths agree on every string. Special ids come from the table by name, never from a fixed list.
    """

    # torchtune writes a message's non-text part ({"type": "image"}) as `image_id`: here, an audio slot
    image_id = AUDIO_SLOT

    def __init__(
        self,
        path: str | Path,
        vocab: SpeechVocab | None = None,
        max_seq_len: int | None = None,
        prompt_template: PromptTemplate | None = None,
        *,
        special_tokens: dict[str, int] | None = None,
    ) -> None:
        # Llama3Tokenizer.__init__ is not called: it insists on torchtune's own special-token names
        # (<|step_id|>, <|image|> = B+256) that differ from most published Llama 3 tokenizers and collide
        # with the first DSU id. Every attribute its methods use is set here instead.
        n_bpe = count_bpe_ranks(path)
        if vocab is not None and vocab.n_bpe != n_bpe:
            raise VocabError(f"{path} has {n_bpe} BPE ranks but the manifest says n_bpe={vocab.n_bpe}")
        table = vocab.special_tokens if vocab is not None else special_tokens
        if table is None:
            raise VocabError(f"{path}: the special-token table is needed (the manifest's, or the base's files')")
        self.vocab = vocab
        self.special_tokens = dict(table)
        self.bos_id = table[specials.BOS]
        self.eos_id = table[specials.EOS]
        self.pad_id = table[specials.pad_name(table)]
        self.start_header_id = table["<|start_header_id|>"]
        self.end_header_id = table["<|end_header_id|>"]
        self.eot_id = table["<|eot_id|>"]
        self.eom_id = table.get("<|eom_id|>")  # Llama 3.0 has none
        self.python_tag = table.get("<|python_tag|>")
        self.stop_tokens = [table[name] for name in specials.stop_names(table)]
        self.tt_model = TikTokenBaseTokenizer(
            path=str(path),
            name="ssi_llama3_tiktoken",
            pattern=CL100K_PATTERN,
            bos_id=self.bos_id,
            eos_id=self.eos_id,
            special_tokens=self.special_tokens,
        )
        if self.tt_model.base_vocab_size != n_bpe:
            raise VocabError(f"{path}: {n_bpe} lines but {self.tt_model.base_vocab_size} distinct ranks")
        self.max_seq_len = max_seq_len
        self.prompt_template = prompt_template
        self._special_token_regex = re.compile(r"<\|.*?\|>")
        self._special_token_header_regex = re.compile(r"<\|start_header_id\|>.*?<\|end_header_id\|>\n\n")

        self._added_ids = dict(self.special_tokens)
        self._added_ids.update(vocab.modality_token_ids if vocab else {})
        self._added_strings = {i: s for s, i in self._added_ids.items()}
        self._modality_ids = set(vocab.modality_token_ids.values()) if vocab else set()

    @property
    def base_vocab_size(self) -> int:
        return self.tt_model.base_vocab_size

    @property
    def vocab_size(self) -> int:
        return self.vocab.vocab_size if self.vocab else self.tt_model.vocab_size

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> list[int]:
        ids = [self.bos_id] if add_bos else []
        start = 0
        for match in _ADDED_TOKEN_PATTERN.finditer(text):
            piece = match.group()
            is_dsu_run = piece[0] >= chr(DSU_CHAR_OFFSET)
            if is_dsu_run and self.vocab is None:
                continue
            token_id = None if is_dsu_run else self._added_ids.get(piece)
            if not is_dsu_run and token_id is None:
                continue
            ids.extend(self._encode_plain(text[start : match.start()]))
            ids.extend(self.vocab.dsu_ids_of_text(piece, match.start()) if is_dsu_run else [token_id])
            start = match.end()
        ids.extend(self._encode_plain(text[start:]))
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def _encode_plain(self, text: str) -> list[int]:
        return self.tt_model.encode(text, add_bos=False, add_eos=False) if text else []

    def decode(
        self,
        token_ids: list[int],
        truncate_at_eos: bool = True,
        skip_special_tokens: bool = True,
    ) -> str:
        """Decode ids; DSU ids become their characters, modality tokens their strings.

        With `skip_special_tokens`, Llama 3 headers/special tokens and modality tokens are removed.
        """
        token_ids = list(token_ids)
        if truncate_at_eos and self.eos_id in token_ids:
            token_ids = token_ids[: token_ids.index(self.eos_id)]
        pieces: list[str] = []
        run: list[int] = []
        base_end = self.tt_model.vocab_size
        for token_id in token_ids:
            if 0 <= token_id < base_end:
                run.append(token_id)
                continue
            if run:
                pieces.append(self.tt_model.tt_model.decode(run))
                run = []
            if self.vocab is not None and self.vocab.is_dsu_id(token_id):
                pieces.append(dsu_to_char(self.vocab.unit_of(token_id)))
            elif token_id in self._modality_ids:
                pieces.append("" if skip_special_tokens else self._added_strings[token_id])
            else:
                raise VocabError(f"token id {token_id} is outside the vocabulary (size {self.vocab_size})")
        if run:
            pieces.append(self.tt_model.tt_model.decode(run))
        text = "".join(pieces)
        return self._remove_special_tokens(text) if skip_special_tokens else text


def load_base_tokenizer(model_dir: str | Path) -> SpeechLlama3Tokenizer:
    """The tiktoken-path tokenizer of a base (unextended) Llama 3 directory, special tokens from its files."""
    model_dir = Path(model_dir)
    n_bpe = count_bpe_ranks(model_dir / TIKTOKEN_FILE)
    try:
        table = specials.read_special_tokens(model_dir, n_bpe)
    except specials.SpecialTokenError as err:
        raise VocabError(str(err)) from None
    return SpeechLlama3Tokenizer(model_dir / TIKTOKEN_FILE, special_tokens=table)


def load_tokenizer(
    model_dir: str | Path,
    vocab: SpeechVocab | None = None,
    max_seq_len: int | None = None,
    prompt_template: PromptTemplate | None = None,
) -> SpeechLlama3Tokenizer:
    """The tiktoken-path tokenizer of an extended model directory; `vocab` is its `ssi.json`, read here
    unless the caller has already loaded it (load it once per process and pass it down)."""
    model_dir = Path(model_dir)
    return SpeechLlama3Tokenizer(
        model_dir / TIKTOKEN_FILE,
        vocab=vocab if vocab is not None else SpeechVocab.load(model_dir),
        max_seq_len=max_seq_len,
        prompt_template=prompt_template,
    )


def model_tokenizer(model_dir: str | Path, vocab: SpeechVocab | None) -> SpeechLlama3Tokenizer:
    """The tokenizer of a model directory: over its extended vocabulary (`vocab`, its ssi.json), or a base
    Llama 3's (vocab None: the features method reads base models)."""
    return load_tokenizer(model_dir, vocab) if vocab is not None else load_base_tokenizer(model_dir)
