"""Search drivers: the local Optuna runner, shared-storage workers and (``ray_runner``, needs the ``ray``
extra) Ray Tune, all on the same objective and runner seams."""

from __future__ import annotations

from .run_setup import open_run, prepare
from .runner import RunSummary, record_failure, record_success, run_study, suggest_plan
from .samplers import SAMPLERS, make_sampler
from .worker import run_worker

__all__ = [
    "RunSummary",
    "open_run",
    "record_failure",
    "record_success",
    "suggest_plan",
    "SAMPLERS",
    "make_sampler",
    "prepare",
    "run_study",
    "run_worker",
]
