"""The trial deadline: ``trials.trial_timeout_s``, enforced cooperatively.

:func:`trial_scope` starts the clock when a trial starts; :func:`check_deadline` raises
:class:`TrialTimeout` once it has passed. It is called at every fine-tuning step (a step of a model this tool fine-tunes takes milliseconds to
seconds) and between the stages of a trial (after lowering, after evaluation, after timing). A stage
that cannot be interrupted from Python (``torch.onnx.export``, ONNX Runtime's quantizer, one timing
session, itself capped by ``timing.max_s``) finishes, and the trial then fails as timed out: its result
is discarded, never recorded. No thread or signal interrupts code at an arbitrary point, so a timed-out
trial cannot leave a lock held or a file half written.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Iterator

from .errors import TrialTimeout

_trial: contextvars.ContextVar[int | None] = contextvars.ContextVar("autocompress_trial", default=None)
_deadline: contextvars.ContextVar[tuple[float, float] | None] = contextvars.ContextVar(
    "autocompress_deadline", default=None
)


@contextlib.contextmanager
def trial_scope(number: int | None, timeout_s: float | None) -> Iterator[None]:
    """Mark the code inside as trial ``number``, with a wall-time limit of ``timeout_s`` (None: none)."""
    t1 = _trial.set(number)
    t2 = _deadline.set((time.monotonic() + timeout_s, timeout_s) if timeout_s else None)
    try:
        yield
    finally:
        _deadline.reset(t2)
        _trial.reset(t1)


def current_trial() -> int | None:
    """The number of the trial running in this context (None outside a trial)."""
    return _trial.get()


def check_deadline(stage: str) -> None:
    """Raise :class:`TrialTimeout` if the current trial has run past its limit.

    Raises:
        TrialTimeout: naming the limit and the stage that was running.
    """
    d = _deadline.get()
    if d is not None and time.monotonic() > d[0]:
        raise TrialTimeout(f"exceeded trials.trial_timeout_s = {d[1]:g} s during {stage}")
