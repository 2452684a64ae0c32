"""See exactly what the model will see: readable rendering of token ids and dataset statistics.

Used by `scripts/inspect_data.py`. Rendering goes id by id (never through a decode that could hide
a mistake): BPE runs are decoded as text, each DSU id is shown as `<unit>`, each special or modality
token by its name.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm import tqdm

from ssi.data.config import build_dataset, section_source
from ssi.data.cpt import CPTDataset, dedup_units
from ssi.data.sft import SFTDataset
from ssi.vocab.tiktoken import SpeechLlama3Tokenizer

LOGGER = logging.getLogger(__name__)
KIND_NAMES = ("text", "dsu", "special")


class TokenRenderer:
    """Token ids -> readable text: `<12><12><7>` for DSUs, names for special tokens."""

    def __init__(self, tokenizer: SpeechLlama3Tokenizer) -> None:
        if tokenizer.vocab is None:
            raise ValueError("rendering needs a speech-extended tokenizer")
        self.tokenizer = tokenizer
        self.vocab = tokenizer.vocab
        names = {i: s for s, i in tokenizer.special_tokens.items()}
        names.update({i: s for s, i in tokenizer.vocab.modality_token_ids.items()})
        self._names = names

    def render(self, tokens: Iterable[int]) -> str:
        pieces: list[str] = []
        text_run: list[int] = []
        for token in tokens:
            if token < self.vocab.n_bpe:
                text_run.append(token)
                continue
            if text_run:
                pieces.append(self.tokenizer.tt_model.decode(text_run))
                text_run = []
            if self.vocab.is_dsu_id(token):
                pieces.append(f"<{self.vocab.unit_of(token)}>")
            else:
                pieces.append(self._names.get(token, f"<?{token}>"))
        if text_run:
            pieces.append(self.tokenizer.tt_model.decode(text_run))
        return "".join(pieces)

    def counts(self, tokens: Iterable[int]) -> dict[str, int]:
        out = dict.fromkeys(KIND_NAMES, 0)
        for token in tokens:
            out[self.vocab.kind_of(token)] += 1
        return out


@dataclass
class DatasetStats:
    """Statistics over built sequences of one split."""

    lengths: list[int] = field(default_factory=list)
    kind_totals: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KIND_NAMES, 0))
    n_truncated: int = 0
    n_frames: int = 0  # raw speech frames of the inspected samples
    n_frames_dedup: int = 0  # the same after collapsing repeats
    n_trained: int = 0  # label positions that are not -100 (SFT)
    sequence_types: dict[str, int] = field(default_factory=dict)

    def format(self) -> str:
        if not self.lengths:
            return "no samples"
        lengths = np.asarray(self.lengths)
        pct = np.percentile(lengths, [5, 25, 50, 75, 95])
        total = int(lengths.sum())
        shares = ", ".join(f"{k} {v / total:.1%}" for k, v in self.kind_totals.items())
        lines = [
            f"samples: {lengths.size}, tokens: {total} (mean {lengths.mean():.1f}, max {lengths.max()})",
            "length percentiles p5/p25/p50/p75/p95: " + "/".join(f"{p:.0f}" for p in pct),
            f"token shares: {shares}",
            f"truncated: {self.n_truncated} ({self.n_truncated / lengths.size:.1%})",
            f"dedup ratio: collapsing repeated units keeps {self.n_frames_dedup / max(self.n_frames, 1):.1%} "
            f"of {self.n_frames} frames",
        ]
        if self.n_trained:
            lines.append(f"trained label positions: {self.n_trained} ({self.n_trained / total:.1%} of tokens)")
        if self.sequence_types:
            lines.append("sequence types: " + ", ".join(f"{k} {v}" for k, v in sorted(self.sequence_types.items())))
        return "\n".join(lines)


def collect_stats(dataset: CPTDataset | SFTDataset, renderer: TokenRenderer, n: int) -> DatasetStats:
    """Build the first `n` samples and accumulate their statistics."""
    stats = DatasetStats()
    count = min(n, len(dataset))
    speech_column = dataset.columns.speech
    for index in tqdm(range(count), desc="statistics", leave=False):
        if isinstance(dataset, CPTDataset):
            sample = dataset.build(index)
            tokens, truncated = sample.tokens, sample.truncated
            stats.sequence_types[sample.sequence_type] = stats.sequence_types.get(sample.sequence_type, 0) + 1
        else:
            example = dataset.build(index)
            tokens, truncated = example.tokens, example.truncated
            if not dataset.inference:
                stats.n_trained += sum(1 for label in example.labels if label >= 0)
        units = np.asarray(dataset.ds[index][speech_column])
        stats.n_frames += units.size
        stats.n_frames_dedup += dedup_units(units).size
        stats.lengths.append(len(tokens))
        stats.n_truncated += int(truncated)
        for kind, value in renderer.counts(tokens).items():
            stats.kind_totals[kind] += value
    return stats


def _cut(text: str, max_chars: int | None) -> str:
    if max_chars is None or len(text) <= max_chars:
        return text
    return text[:max_chars] + f" ... [{len(text) - max_chars} more characters]"


def inspection_report(cfg: Mapping[str, Any], tokenizer: SpeechLlama3Tokenizer) -> str:
    """The full text `scripts/inspect_data.py` prints for a composed config (`data` plus inspection keys)."""
    data, split = cfg["data"], str(cfg["split"])
    built = build_dataset(data, split, tokenizer, inference=bool(cfg.get("inference", False)))
    dataset = built.dataset
    dataset.set_epoch(int(cfg.get("epoch", 0)))
    renderer = TokenRenderer(tokenizer)
    seq, where = data["sequence"], section_source(data, split)
    # the settings this kind of preset uses: CPT builds sequences of a type, SFT builds chat examples
    if data["kind"] == "cpt":
        shape = f"sequence: type={seq['type']}" + (f" mixture={seq['mixture']}" if seq["type"] == "mixture" else "")
    else:
        sft = data["sft"]
        shape = (
            f"sft: chat examples (instruction={sft['instruction']!r}, system_prompt={sft['system_prompt']!r}, "
            f"train_on_input={sft['train_on_input']})"
        )
    lines = [
        f"preset: kind={data['kind']} section={split} source={where.spec.resolved} split={where.split}",
        f"encoder: {built.encoder.name}, {built.encoder.n_units} units at {built.encoder.fps:g} Hz "
        f"({built.encoder.sampling_rate} / {built.encoder.downsampling_ratio})",
        f"{shape} dedup={seq['dedup']} modality_tokens={seq['modality_tokens']} "
        f"max_seq_len={seq['max_seq_len']} packing={data['packing']['enabled']}",
        f"validation: {built.report.summary(built.encoder.fps)}",
    ]
    max_chars = cfg.get("max_chars")
    for index in range(min(int(cfg.get("n_examples", 3)), len(dataset))):
        if isinstance(dataset, CPTDataset):
            sample = dataset.build(index)
            title = f"{sample.id} ({sample.sequence_type}{', truncated' if sample.truncated else ''})"
            tokens, labels = sample.tokens, None
        else:
            example = dataset.build(index)
            title = f"{example.id}{' (truncated)' if example.truncated else ''}"
            tokens, labels = example.tokens, None if dataset.inference else example.labels
        counts = renderer.counts(tokens)
        lines += [
            "",
            f"=== example {index}: {title}",
            f"tokens: {len(tokens)} = text {counts['text']} + dsu {counts['dsu']} + special {counts['special']}",
            _cut(renderer.render(tokens), max_chars),
        ]
        if labels is not None:
            trained = [t for t, label in zip(tokens, labels, strict=True) if label >= 0]
            lines += [
                f"--- trained on ({len(trained)} of {len(tokens)} positions; the rest have label -100):",
                _cut(renderer.render(trained), max_chars),
            ]
        elif isinstance(dataset, SFTDataset):
            lines.append(f"--- reference: {example.reference}")
    n_stats = len(dataset) if cfg.get("n_stats") is None else min(int(cfg["n_stats"]), len(dataset))
    lines += ["", f"=== statistics over the first {n_stats} of {len(dataset)} samples"]
    lines.append(collect_stats(dataset, renderer, n_stats).format())
    return "\n".join(lines)
