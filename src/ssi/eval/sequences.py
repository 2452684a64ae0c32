"""Benchmark items as token sequences, built with the CPT sequence pieces (`ssi.data.cpt`) and the settings
the checkpoint's run trained with, and which of their tokens are scored (docs/evaluation.md, "Scoring").

A sequence is `[BOS] [M(prefix)] prefix [M(candidate)] candidate [EOS]`, M being the modality token
(`<extra_id_MM_SPEECH>` / `<extra_id_MM_TEXT>`) when the run used them. A candidate of the prefix's
modality continues the prefix's span, as in an interleaved training sequence: no modality token between
them, text continues with a space, and speech is deduplicated over the joined span (a candidate whose
first units repeat the prefix's last unit loses them). The scored tokens are the candidate's own tokens
and the EOS when the run appended one; BOS, modality tokens and the prefix are context.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from ssi.data.cpt import Part, assemble, dedup_units, modality_token_ids, speech_token_ids, text_token_ids
from ssi.eval.items import SPEECH, BenchmarkError, Item, Segment
from ssi.vocab.tiktoken import SpeechLlama3Tokenizer

# For a model outside a run: what the CPT presets default to (conf/data/_common.yaml), except modality
# tokens, which follow the model (on when it has them).
DEFAULTS = {"dedup": False, "add_bos": True, "add_eos": True}
SETTING_KEYS = ("dedup", "modality_tokens", "add_bos", "add_eos")


@dataclass(frozen=True)
class SequenceSettings:
    """The `data.sequence` options a benchmark sequence is built with, and where they came from."""

    dedup: bool
    modality_tokens: bool
    add_bos: bool
    add_eos: bool
    source: str

    def record(self) -> dict[str, Any]:
        return asdict(self)


def resolve_settings(
    overrides: Mapping[str, Any], run_config: Path | None, model_has_modality_tokens: bool
) -> SequenceSettings:
    """Command-line `sequence.*` values win; the rest come from the run's `data.sequence` (its
    torchtune_config.yaml), or for a model outside a run from `DEFAULTS`."""
    given = {k: overrides.get(k) for k in SETTING_KEYS}
    unknown = sorted(set(overrides) - set(SETTING_KEYS))
    if unknown:
        raise BenchmarkError(f"sequence: unsupported key(s) {unknown}; supported: {list(SETTING_KEYS)}")
    if run_config is not None:
        run_sequence = OmegaConf.to_container(OmegaConf.load(run_config)).get("data", {}).get("sequence", {})
        missing = [k for k in SETTING_KEYS if given[k] is None and k not in run_sequence]
        if missing:
            raise BenchmarkError(
                f"{run_config}: data.sequence has no {missing}; give sequence.<key>= on the command line"
            )
        base, source = run_sequence, f"{run_config} (data.sequence)"
    else:
        base = {**DEFAULTS, "modality_tokens": model_has_modality_tokens}
        source = "defaults for a model outside a run"
    values = {k: bool(base[k] if given[k] is None else given[k]) for k in SETTING_KEYS}
    if any(given[k] is not None for k in SETTING_KEYS):
        source += " + command line"
    return SequenceSettings(**values, source=source)


@dataclass(frozen=True)
class ScoredSequence:
    """A full token sequence; `tokens[start:]` are scored (each given everything before it)."""

    tokens: list[int]
    start: int

    @property
    def n_scored(self) -> int:
        return len(self.tokens) - self.start


class SequenceBuilder:
    """Turns items into (positive, negative) scored sequences for one model and one set of settings."""

    def __init__(self, tokenizer: SpeechLlama3Tokenizer, settings: SequenceSettings) -> None:
        if tokenizer.vocab is None:
            raise BenchmarkError("benchmarks need a speech-extended model (ssi.json)")
        self.tokenizer, self.settings, self.vocab = tokenizer, settings, tokenizer.vocab
        text_id, speech_id = modality_token_ids(self.vocab, settings.modality_tokens)
        self._modality = {"text": text_id, SPEECH: speech_id}

    def pair(self, item: Item) -> tuple[ScoredSequence, ScoredSequence]:
        return self.build(item, item.positive, "positive"), self.build(item, item.negative, "negative")

    def build(self, item: Item, candidate: Segment, field: str) -> ScoredSequence:
        parts: list[Part] = []
        prefix = item.prefix
        if prefix is not None:
            parts.append((self._modality[prefix.modality], self._ids(prefix)))
        if prefix is not None and prefix.modality == candidate.modality:
            context = assemble(parts, self._bos(), None)
            ids = self._continuation(prefix, candidate)
            tokens = context + ids
        else:
            parts.append((self._modality[candidate.modality], []))
            context = assemble(parts, self._bos(), None)
            ids = self._ids(candidate)
            tokens = context + ids
        if self.settings.add_eos:
            tokens.append(self.tokenizer.eos_id)
        start = len(context)
        if start == 0:
            raise BenchmarkError(
                f"item {item.id!r}: nothing precedes the {field} candidate (add_bos=false, no modality token, no "
                "prefix), so its first token cannot be scored"
            )
        if len(tokens) == start:
            raise BenchmarkError(f"item {item.id!r}: the {field} candidate has no token left after deduplication")
        return ScoredSequence(tokens, start)

    def _bos(self) -> int | None:
        return self.tokenizer.bos_id if self.settings.add_bos else None

    def _ids(self, segment: Segment) -> list[int]:
        if segment.units is not None:
            return speech_token_ids(np.asarray(segment.units, dtype=np.int64), self.vocab, self.settings.dedup).tolist()
        return text_token_ids(self.tokenizer, str(segment.text))

    def _continuation(self, prefix: Segment, candidate: Segment) -> list[int]:
        """The candidate's ids when it continues the prefix's span (same modality)."""
        if candidate.units is None:
            return text_token_ids(self.tokenizer, str(candidate.text), continuation=True)
        assert prefix.units is not None
        joined = np.asarray(prefix.units + candidate.units, dtype=np.int64)
        if not self.settings.dedup:
            return self.vocab.dsu_ids(joined[len(prefix.units) :]).tolist()
        n_prefix = dedup_units(joined[: len(prefix.units)]).size
        return self.vocab.dsu_ids(dedup_units(joined))[n_prefix:].tolist()
