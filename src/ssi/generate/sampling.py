"""What both generation backends honour, with vLLM's meaning: the sampling options, and how a finished
output is classified (it ended on a stop token, or ran out of room)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ssi.generate import GenerationError

FINISH_STOP, FINISH_LENGTH = "stop", "length"


@dataclass(frozen=True)
class SamplingOptions:
    """vLLM's sampling parameters that both backends implement identically (the `sampling_params` section).

    temperature 0 is greedy; top_k 0 (or -1) and top_p 1 disable those filters; repetition_penalty 1
    disables the penalty; seed None draws fresh randomness (prompt i otherwise uses seed + i).
    """

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = 0

    def __post_init__(self) -> None:
        checks = {
            "max_tokens": (self.max_tokens >= 1, "an integer >= 1"),
            "temperature": (self.temperature >= 0, ">= 0 (0 = greedy)"),
            "top_p": (0 < self.top_p <= 1, "in (0, 1]"),
            "top_k": (self.top_k >= -1, ">= 1, or 0/-1 to disable"),
            "repetition_penalty": (self.repetition_penalty > 0, "> 0 (1 = off)"),
        }
        for key, (ok, expected) in checks.items():
            if not ok:
                raise GenerationError(f"sampling_params.{key} must be {expected}, got {getattr(self, key)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> SamplingOptions:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise GenerationError(
                f"sampling_params: unsupported key(s) {', '.join(unknown)}; supported: {', '.join(sorted(known))}"
            )
        values = dict(cfg)
        casts = {"max_tokens": int, "top_k": int, "temperature": float, "top_p": float, "repetition_penalty": float}
        try:
            values = {k: (casts[k](v) if k in casts else v) for k, v in values.items()}
        except (TypeError, ValueError) as err:
            raise GenerationError(f"sampling_params: {err}") from None
        if values.get("seed") is not None:
            values["seed"] = int(values["seed"])
        return cls(**values)


@dataclass(frozen=True)
class Completion:
    """What a backend generated for one prompt; the stop token (if any) is the last of `token_ids`."""

    token_ids: list[int]
    finish_reason: str  # "stop" (a stop token was generated) or "length" (max_tokens / max_model_len reached)
    stop_token_id: int | None


def completion(token_ids: Sequence[int], stop_ids: Sequence[int]) -> Completion:
    """Classify a finished output the same way for both backends: it ends on a stop token or ran out of room."""
    tokens = [int(t) for t in token_ids]
    if tokens and tokens[-1] in stop_ids:
        return Completion(tokens, FINISH_STOP, tokens[-1])
    return Completion(tokens, FINISH_LENGTH, None)
