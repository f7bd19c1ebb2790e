"""Search drivers: the local Optuna runner (the Ray runner builds on the same objective)."""

from __future__ import annotations

from .runner import RunSummary, open_run, prepare, record_failure, record_success, run_study, suggest_plan
from .samplers import SAMPLERS, make_sampler

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
]
