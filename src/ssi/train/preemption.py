"""Stop signals: a run that is told to stop finishes its step, saves a checkpoint, and then whoever started it
decides what happens next (docs/experiments.md, "Requeue and resume").

- SIGTERM, SIGUSR1 (`snippets/train.sbatch` asks Slurm for it before the time limit) and submitit's preemption
  signal (SIGUSR2, or `SUBMITIT_PREEMPT_SIGNAL`) all stop the run the same way.
- After the checkpoint the signal is handed to the handler that was installed before the recipe's, when that
  is a Python function: inside a submitit job that is submitit's, which requeues the job (its next attempt
  resumes) or, after too many time-outs, fails it. Without one the process exits with `EXIT_PREEMPTED` and an
  sbatch script requeues itself.
- The previous handlers are put back when the run ends, so the jobs of a local sweep (one process) never
  stack handlers.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 99  # the run stopped on a signal after saving; requeue and resume from `latest`


def submitit_signal() -> signal.Signals:
    """The signal submitit sends before the time limit and on preemption (its `SUBMITIT_PREEMPT_SIGNAL`)."""
    return signal.Signals[f"SIG{os.environ.get('SUBMITIT_PREEMPT_SIGNAL', 'USR2')}"]


class StopSignals:
    """Records the first stop signal; `hand_over` passes it on after the stop checkpoint."""

    def __init__(self) -> None:
        self.received = 0
        self._previous: dict[int, Any] = {}
        self._handover: Callable[[int, Any], Any] | None = None

    def install(self) -> None:
        for sig in {signal.SIGTERM, signal.SIGUSR1, submitit_signal()}:
            self._previous[sig] = signal.signal(sig, self._request)

    def _request(self, signum: int, _frame: Any) -> None:
        if not self.received:
            self.received = signum
            previous = self._previous.get(signum)
            self._handover = previous if callable(previous) else None

    def restore(self) -> None:
        """Put back the handlers found at `install` (e.g. submitit's, or the defaults)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def hand_over(self) -> None:
        """Give the stop signal to the handler that was there before ours (may requeue and exit)."""
        if self._handover is not None and self.received:
            log.info("handing %s over to %s", signal.Signals(self.received).name, _name(self._handover))
            self._handover(self.received, None)


def _name(handler: Callable[..., Any]) -> str:
    owner = getattr(handler, "__self__", None)
    return f"{type(owner).__module__}.{type(owner).__name__}" if owner is not None else repr(handler)
