"""A synthetic speech-unit corpus in the published MLS DSU schema, learnable by a tiny model.

Each word of a small built-in vocabulary is a fixed sequence of "phones" (units drawn once from a
generator seeded by the word), spoken with random durations (each phone repeated 2-5 frames), with
short silences (unit 0) between words and ~3% of frames replaced by a random unit. DSU -> text is
therefore a deterministic mapping blurred by duration and noise, which a small Llama learns in a few
hundred steps. Word alignments are exact frame boundaries at the chosen frame rate, so every split
passes validation with zero tolerance.
"""

from __future__ import annotations

import argparse
import json
import logging
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from tqdm import tqdm

from ssi import setup_cli_logging
from ssi.files import atomic_output_dir

LOGGER = logging.getLogger(__name__)

_WORD_LIST = """
the a one two three four five six seven eight nine ten red green blue black white small big old new
cat dog bird fish horse cow tree house river stone book door light night day sun moon rain wind fire
runs sees likes finds has takes gives makes walks sings and with under over near far
"""
WORDS = tuple(_WORD_LIST.split())
SILENCE_UNIT = 0
SPLITS = {"train": "n_train", "validation": "n_validation", "test": "n_test"}


@dataclass(frozen=True)
class SyntheticSpec:
    """Everything that determines the corpus; written next to the data as `synthetic.json`."""

    n_train: int = 2000
    n_validation: int = 200
    n_test: int = 200
    n_units: int = 300
    sampling_rate: int = 16000
    downsampling_ratio: int = 320
    min_words: int = 4
    max_words: int = 12
    noise: float = 0.03
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_units < 8:
            raise ValueError(f"n_units must be >= 8 (unit 0 is silence, phones use the rest), got {self.n_units}")
        if not 1 <= self.min_words <= self.max_words:
            raise ValueError(f"need 1 <= min_words <= max_words, got {self.min_words}, {self.max_words}")
        if not 0 <= self.noise < 1:
            raise ValueError(f"noise must be in [0, 1), got {self.noise}")

    @property
    def fps(self) -> float:
        return self.sampling_rate / self.downsampling_ratio


def word_phones(word: str, n_units: int) -> np.ndarray:
    """The fixed phone sequence of a word (2-6 units from 1..n_units-1), stable across runs and machines."""
    rng = np.random.default_rng(zlib.crc32(word.encode()))
    n_phones = min(6, max(2, (len(word) + 1) // 2))
    return rng.integers(1, n_units, n_phones)


def synthesize_utterance(words: list[str], spec: SyntheticSpec, rng: np.random.Generator) -> dict[str, Any]:
    """Speech units and frame-exact word alignments for one sentence."""
    frames: list[np.ndarray] = [np.full(int(rng.integers(2, 8)), SILENCE_UNIT)]
    at = frames[0].size
    starts, ends = [], []
    for k, word in enumerate(words):
        phones = word_phones(word, spec.n_units)
        units = np.repeat(phones, rng.integers(2, 6, phones.size))
        starts.append(at / spec.fps)
        at += units.size
        ends.append(at / spec.fps)
        frames.append(units)
        pause = int(rng.integers(3, 8)) if k == len(words) - 1 else int(rng.integers(0, 3))
        frames.append(np.full(pause, SILENCE_UNIT))
        at += pause
    speech = np.concatenate(frames)
    noisy = rng.random(speech.size) < spec.noise
    speech[noisy] = rng.integers(0, spec.n_units, int(noisy.sum()))
    return {
        "transcript": " ".join(words),
        "tokenized": list(words),
        "aligned_token_start_time": [round(t, 6) for t in starts],
        "aligned_token_end_time": [round(t, 6) for t in ends],
        "speech_tokens": speech.tolist(),
    }


def synthetic_split(spec: SyntheticSpec, split: str, progress: bool = True) -> datasets.Dataset:
    """One split; each split has its own generator, so growing one split never changes another."""
    n = getattr(spec, SPLITS[split])
    rng = np.random.default_rng([spec.seed, list(SPLITS).index(split)])
    rows = []
    for i in tqdm(range(n), desc=f"synthetic {split}", disable=not progress):
        n_words = int(rng.integers(spec.min_words, spec.max_words + 1))
        words = [WORDS[j] for j in rng.integers(0, len(WORDS), n_words)]
        rows.append({"ID": f"synth_{split}_{i:06d}", **synthesize_utterance(words, spec, rng)})
    return datasets.Dataset.from_list(rows)


def make_synthetic_dataset(
    output_dir: str | Path, spec: SyntheticSpec | None = None, overwrite: bool = False, progress: bool = True
) -> Path:
    """Write `train/validation/test.parquet` (+ `synthetic.json`) atomically; refuse to replace without `overwrite`.

    The folder is a valid `source` for the data presets: `load_dataset(<folder>, split=...)` finds the
    splits by file name.
    """
    spec = spec or SyntheticSpec()
    output_dir = Path(output_dir)
    with atomic_output_dir(output_dir, overwrite=overwrite) as tmp:
        for split in SPLITS:
            ds = synthetic_split(spec, split, progress=progress)
            ds.to_parquet(str(tmp / f"{split}.parquet"))
            frames = sum(len(s) for s in ds["speech_tokens"])
            hours = frames / spec.fps / 3600
            LOGGER.info("%s: %d utterances, %.2f h of speech at %g Hz", split, len(ds), hours, spec.fps)
        meta = {**asdict(spec), "fps": spec.fps, "words": list(WORDS), "silence_unit": SILENCE_UNIT}
        (tmp / "synthetic.json").write_text(json.dumps(meta, indent=2) + "\n")
    return output_dir


def build_parser() -> argparse.ArgumentParser:
    defaults = SyntheticSpec()
    parser = argparse.ArgumentParser(
        description="Write a synthetic DSU corpus (train/validation/test parquet) in the published MLS DSU schema.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--output_dir", type=Path, default=Path("data/synthetic"), help="folder to create")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    for name in ("n_train", "n_validation", "n_test", "min_words", "max_words", "seed"):
        parser.add_argument(f"--{name}", type=int, default=getattr(defaults, name))
    parser.add_argument(
        "--n_units", type=int, default=defaults.n_units, help="DSU vocabulary size; must not exceed the model's n_dsus"
    )
    parser.add_argument("--sampling_rate", type=int, default=defaults.sampling_rate, help="Hz of the pretend audio")
    parser.add_argument(
        "--downsampling_ratio", type=int, default=defaults.downsampling_ratio, help="audio samples per frame"
    )
    parser.add_argument("--noise", type=float, default=defaults.noise, help="fraction of frames replaced at random")
    return parser


def main(argv: list[str] | None = None) -> int:
    setup_cli_logging()
    args = vars(build_parser().parse_args(argv))
    output_dir, overwrite = args.pop("output_dir"), args.pop("overwrite")
    try:
        spec = SyntheticSpec(**args)
        out = make_synthetic_dataset(output_dir, spec, overwrite=overwrite)
    except (ValueError, FileExistsError) as err:
        LOGGER.error("%s", err)
        return 2
    sizes = f"{spec.n_train}/{spec.n_validation}/{spec.n_test}"
    print(f"wrote {out} (train/validation/test: {sizes} utterances, {spec.n_units} units at {spec.fps:g} Hz)")
    return 0
