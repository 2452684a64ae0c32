"""When a run ends: `max_steps`, `max_tokens`, `max_hours`, `max_audio_hours` and `epochs`, and the learning-rate
span they imply.

On a Slurm cluster the wall clock binds, and steps are a poor proxy for it (slamkit trains "on one GPU in
a day" the same way). A budget ends training at the next step boundary with a checkpoint, like a
preemption, and the reason is recorded (`STOP_REASONS`) in the training state and in `logs/stops.jsonl`.
Each budget reads one of the run's totals (summed over ranks, kept in the checkpoint, continued on resume):

- `max_tokens`: `tokens`, every non-padding position trained on: text, special and speech positions (unit
  tokens with method=units, audio slots with method=features). The methods put different numbers of positions
  on a second of speech (HuBERT units 50, the default projector 10), so equal tokens are not equal data.
- `max_audio_hours`: `audio_seconds`, the audio behind the speech positions (ssi.train.throughput.AudioClock):
  the budget to compare methods or encoders at equal data.
- `max_hours`: `wall_seconds`, the run's wall clock from the start of set-up to each step boundary, summed
  over resumes and requeues (the time a job waited in the queue does not count).

With `lr_scheduler.span=budget` the cosine decays over whichever budget binds first. Its length in steps is
estimated once, at the end of warmup (or after step 1 without warmup), from the tokens, audio and seconds per
step measured so far; it is kept in the scheduler's state, so a resume continues the same schedule, and
estimated again on resume only when a budget was changed. `span=max_steps` spans `max_steps` always.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

STOP_REASONS = ("max_steps", "max_tokens", "max_hours", "max_audio_hours", "epochs", "signal")
SPANS = ("max_steps", "budget")


class BudgetError(ValueError):
    """A budget or schedule setting that cannot be applied."""


@dataclass(frozen=True)
class Budget:
    max_steps: int
    max_tokens: int | None = None
    max_hours: float | None = None
    epochs: int | None = None
    max_audio_hours: float | None = None

    def __post_init__(self) -> None:
        for key in ("max_steps", "max_tokens", "max_hours", "epochs", "max_audio_hours"):
            value = getattr(self, key)
            if value is not None and not value > 0:
                raise BudgetError(f"{key} must be > 0 (or null for no such budget), got {value}")

    @classmethod
    def from_config(cls, cfg: Any) -> Budget:
        def optional(key: str, kind: type) -> Any:
            value = cfg.get(key)
            return None if value is None else kind(value)

        return cls(
            int(cfg.max_steps),
            optional("max_tokens", int),
            optional("max_hours", float),
            optional("epochs", int),
            optional("max_audio_hours", float),
        )

    @classmethod
    def from_saved(cls, saved: Mapping[str, Any]) -> Budget:
        """The budget a checkpoint recorded (`as_dict`); budgets added since then are absent there, i.e. unset."""
        return cls(**saved)

    def reached(self, step: int, totals: Mapping[str, Any]) -> str | None:
        """The budget that ends training at this step boundary, if any (steps, tokens, hours, then audio hours)."""
        if step >= self.max_steps:
            return "max_steps"
        if self.max_tokens is not None and totals["tokens"] >= self.max_tokens:
            return "max_tokens"
        if self.max_hours is not None and totals["wall_seconds"] >= self.max_hours * 3600:
            return "max_hours"
        if self.max_audio_hours is not None and totals["audio_seconds"] >= self.max_audio_hours * 3600:
            return "max_audio_hours"
        return None

    def exhausted(self, step: int, epoch: int, totals: Mapping[str, Any]) -> str | None:
        """`reached`, or the epoch cap: whether a saved position has nothing left to train."""
        if self.epochs is not None and epoch >= self.epochs:
            return "epochs"
        return self.reached(step, totals)

    def describe(self, reason: str) -> str:
        """`max_tokens=1000000` for a reason, as the user sets it."""
        return f"{reason}={self.as_dict()[reason]}"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def span_steps(self, step: int, totals: Mapping[str, Any]) -> int:
        """Steps the schedule spans: `max_steps`, or fewer where the token, audio or hour budget runs out first
        at the rates of the `step` steps so far (tokens and audio seconds per step; training seconds per step for
        the wall clock still left, so that set-up time is not extrapolated)."""
        span = self.max_steps
        if step > 0 and self.max_tokens is not None and totals["tokens"] > 0:
            span = min(span, math.ceil(self.max_tokens * step / totals["tokens"]))
        if step > 0 and self.max_audio_hours is not None and totals["audio_seconds"] > 0:
            span = min(span, math.ceil(self.max_audio_hours * 3600 * step / totals["audio_seconds"]))
        if step > 0 and self.max_hours is not None and totals["train_seconds"] > 0:
            left = max(self.max_hours * 3600 - totals["wall_seconds"], 0.0)
            span = min(span, step + math.ceil(left * step / totals["train_seconds"]))
        return max(span, 1)


class WarmupCosine:
    """Linear warmup, then a cosine over `span` steps (torchtune's get_cosine_schedule_with_warmup, with a
    span that can be set once the budget's rate is known). A callable object, so LambdaLR's state dict keeps
    the span and a resume continues the same schedule."""

    def __init__(self, warmup: int, span: int, cycles: float) -> None:
        self.warmup, self.span, self.cycles = warmup, span, cycles

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return step / max(1, self.warmup)
        progress = (step - self.warmup) / max(1, self.span - self.warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * self.cycles * 2.0 * progress)))


def build_schedule(optimizer: torch.optim.Optimizer, cfg: Any, budget: Budget) -> LambdaLR:
    span = str(cfg.get("span", "max_steps"))
    if span not in SPANS:
        raise BudgetError(f"lr_scheduler.span must be one of {list(SPANS)}, got {span!r}")
    schedule = WarmupCosine(int(cfg.num_warmup_steps), budget.max_steps, float(cfg.num_cycles))
    return LambdaLR(optimizer, schedule)


def schedule_of(scheduler: LambdaLR) -> WarmupCosine:
    return scheduler.lr_lambdas[0]


def span_decision_step(cfg: Any) -> int | None:
    """The step after which `span=budget` fixes the schedule's length (None: `span=max_steps`)."""
    return max(int(cfg.num_warmup_steps), 1) if str(cfg.get("span", "max_steps")) == "budget" else None
