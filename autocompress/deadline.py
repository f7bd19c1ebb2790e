"""The deadlines: the run's ``trials.timeout_s`` and one trial's ``trials.trial_timeout_s``, enforced
cooperatively.

:func:`run_clock` starts the run's clock when a run starts (before its set-up: the teacher, the
baseline, the applicability check and the profile count against the budget the user gave); a trial
then runs until the earlier of its own limit and the run's end.

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
_deadline: contextvars.ContextVar[tuple[float, str] | None] = contextvars.ContextVar(
    "autocompress_deadline", default=None
)
_run: contextvars.ContextVar[tuple[float, float] | None] = contextvars.ContextVar(
    "autocompress_run_deadline", default=None
)
SETUP_SHARE = 0.3  # the optional parts of set-up (the latency profile) stop past this share of the budget


@contextlib.contextmanager
def run_clock(timeout_s: float | None) -> Iterator[None]:
    """Mark the code inside as one run whose wall time is limited to ``timeout_s`` (None: no limit),
    counted from now."""
    token = _run.set((time.monotonic(), timeout_s) if timeout_s else None)
    try:
        yield
    finally:
        _run.reset(token)


def run_remaining() -> float | None:
    """Seconds left of the run's wall-time budget (negative once past it; None without a budget)."""
    r = _run.get()
    return None if r is None else r[0] + r[1] - time.monotonic()


def run_elapsed() -> float | None:
    """Seconds since the run's clock started (None outside :func:`run_clock` or without a budget)."""
    r = _run.get()
    return None if r is None else time.monotonic() - r[0]


_finetune_end: contextvars.ContextVar[float | None] = contextvars.ContextVar("autocompress_finetune_end", default=None)


@contextlib.contextmanager
def finetune_time(seconds: float | None) -> Iterator[None]:
    """Inside, a fine-tune stops (between two steps, keeping what it learned) once ``seconds`` have
    passed (None: no limit): the time a trial's share of the run's budget gave its fine-tune, whatever
    a step really costs (quantization-aware steps are slower than the set-up's float estimate)."""
    token = _finetune_end.set(None if seconds is None else time.monotonic() + max(0.0, seconds))
    try:
        yield
    finally:
        _finetune_end.reset(token)


def finetune_time_up() -> bool:
    """Whether the fine-tune's time (:func:`finetune_time`) is spent."""
    end = _finetune_end.get()
    return end is not None and time.monotonic() >= end


_trials_in_setup: contextvars.ContextVar[float] = contextvars.ContextVar("autocompress_setup_trials", default=0.0)


@contextlib.contextmanager
def trials_during_setup(seconds: float) -> Iterator[None]:
    """Inside, :func:`setup_over` does not count ``seconds`` of the run's elapsed time as set-up: the
    first trials that ran between the two stages of set-up (:mod:`.search.first_trials`) are trials."""
    token = _trials_in_setup.set(max(0.0, seconds))
    try:
        yield
    finally:
        _trials_in_setup.reset(token)


def setup_over(share: float = SETUP_SHARE) -> bool:
    """Whether set-up has spent more than ``share`` of the run's wall-time budget (False without one):
    the optional parts of set-up (profiling more rows) stop there, leaving the rest to trials. The time
    of trials run during set-up (:func:`trials_during_setup`) is not set-up."""
    r = _run.get()
    return r is not None and time.monotonic() - r[0] - _trials_in_setup.get() > share * r[1]


@contextlib.contextmanager
def trial_scope(number: int | None, timeout_s: float | None) -> Iterator[None]:
    """Mark the code inside as trial ``number``, with a wall-time limit of ``timeout_s`` (None: none)
    and, inside :func:`run_clock`, no later than the run's end."""
    t1 = _trial.set(number)
    ends = []
    if timeout_s:
        ends.append((time.monotonic() + timeout_s, f"trials.trial_timeout_s = {timeout_s:g} s"))
    r = _run.get()
    if r is not None:
        ends.append((r[0] + r[1], f"the study's wall-time budget (trials.timeout_s = {r[1]:g} s)"))
    t2 = _deadline.set(min(ends) if ends else None)
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
        raise TrialTimeout(f"exceeded {d[1]} during {stage}")
