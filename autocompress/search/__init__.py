"""Search drivers: the local Optuna runner (the Ray runner builds on the same objective)."""

from __future__ import annotations

from .runner import RunSummary, prepare, run_study
from .samplers import SAMPLERS, make_sampler

__all__ = ["RunSummary", "SAMPLERS", "make_sampler", "prepare", "run_study"]
