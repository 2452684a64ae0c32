"""What `scripts/inspect_data.py` prints for an audio preset (the features method): the prompts as the model
reads them, each audio span shown as its number of positions, encoder frames and seconds, and statistics."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ssi.data.audio_sft import AudioSFTDataset, AudioSFTExample
from ssi.data.config import build_dataset, section_source
from ssi.model.speech_encoder import AudioSlots
from ssi.vocab.tiktoken import AUDIO_SLOT, SpeechLlama3Tokenizer


def render(tokens: list[int], tokenizer: SpeechLlama3Tokenizer, example: AudioSFTExample, slots: AudioSlots) -> str:
    """Text and special tokens by name; the audio span as `<audio: N positions = F frames, S s>`."""
    names = {i: s for s, i in tokenizer.special_tokens.items()}
    pieces: list[str] = []
    text: list[int] = []
    in_audio = False
    for token in tokens:
        if token == AUDIO_SLOT:
            if not in_audio:
                if text:
                    pieces.append(tokenizer.tt_model.decode(text))
                    text = []
                seconds = len(example.audio) / slots.sampling_rate
                frames = slots.frames(len(example.audio))
                pieces.append(
                    f"<audio: {example.n_slots} positions = {frames} frames / {slots.downsample}, {seconds:.2f} s>"
                )
            in_audio = True
            continue
        in_audio = False
        if token < tokenizer.base_vocab_size:
            text.append(token)
            continue
        if text:
            pieces.append(tokenizer.tt_model.decode(text))
            text = []
        pieces.append(names.get(token, f"<?{token}>"))
    if text:
        pieces.append(tokenizer.tt_model.decode(text))
    return "".join(pieces)


def audio_inspection_report(cfg: Mapping[str, Any], tokenizer: SpeechLlama3Tokenizer, slots: AudioSlots) -> str:
    data, split = cfg["data"], str(cfg["split"])
    built = build_dataset(data, split, tokenizer, inference=bool(cfg.get("inference", False)), audio_slots=slots)
    dataset = built.dataset
    assert isinstance(dataset, AudioSFTDataset)
    where, sft = section_source(data, split), data["sft"]
    enc = cfg["speech_encoder"]
    lines = [
        f"preset: kind=sft input=audio section={split} source={where.spec.resolved} split={where.split}",
        f"speech encoder: {enc['model']} layer {enc['layer']}, {slots.sampling_rate} Hz audio; projector stacks "
        f"{slots.downsample} frames per position",
        f"sft: chat examples (instruction={sft['instruction']!r}, system_prompt={sft['system_prompt']!r}, "
        f"train_on_input={sft['train_on_input']}) max_seq_len={data['sequence']['max_seq_len']}",
        f"audio: {len(dataset)} utterances, {sum(dataset.durations) / 3600:.3f} h (from the file headers)",
    ]
    max_chars = cfg.get("max_chars")
    for index in range(min(int(cfg.get("n_examples", 3)), len(dataset))):
        example = dataset.build(index)
        shown = render(example.tokens, tokenizer, example, slots)
        n_tokens = len(example.tokens) - example.n_slots
        lines += [
            "",
            f"=== example {index}: {example.id}{' (truncated)' if example.truncated else ''}",
            f"positions: {len(example.tokens)} = {example.n_slots} audio + {n_tokens} tokens",
            shown if max_chars is None else shown[: int(max_chars)],
        ]
        if not dataset.inference:
            trained = [t for t, label in zip(example.tokens, example.labels, strict=True) if label >= 0]
            lines += [f"--- trained on ({len(trained)} positions):", tokenizer.tt_model.decode(
                [t for t in trained if t < tokenizer.base_vocab_size])]  # fmt: skip
    n_stats = len(dataset) if cfg.get("n_stats") is None else min(int(cfg["n_stats"]), len(dataset))
    examples = [dataset.build(i) for i in range(n_stats)]
    lengths = np.array([len(e.tokens) for e in examples])
    audio = np.array([e.n_slots for e in examples])
    lines += [
        "",
        f"=== statistics over the first {n_stats} of {len(dataset)} utterances",
        f"positions per example: mean {lengths.mean():.1f}, max {lengths.max()} (audio mean {audio.mean():.1f}, "
        f"max {audio.max()}); truncated {sum(e.truncated for e in examples)}",
    ]
    return "\n".join(lines)
