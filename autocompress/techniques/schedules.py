"""Sparsity schedules: the sparsity a layer has at a given point of fine-tuning."""

from __future__ import annotations

import math

from ..errors import TechniqueError

SCHEDULES = ("one_shot", "linear", "cubic", "exponential")
_EXP_RATE = 5.0


def sparsity_at(kind: str, final: float, start: float, end: float, progress: float, steps: int = 0) -> float:
    """Target sparsity at ``progress`` in [0, 1] of fine-tuning.

    - ``one_shot``: 0 before ``start``, ``final`` from ``start`` on.
    - ``linear``: rises linearly from 0 at ``start`` to ``final`` at ``end``.
    - ``cubic``: Zhu & Gupta (2017) gradual pruning, ``final * (1 - (1 - q)^3)`` with
      ``q = (progress - start) / (end - start)``: fast early, gentle near the end.
    - ``exponential``: ``final * (1 - exp(-5 q)) / (1 - exp(-5))``: faster still at first.

    ``steps > 0`` makes the schedule a staircase of ``steps`` equal updates between ``start`` and
    ``end`` (``q`` rounded down to a multiple of ``1 / steps``); 0 updates continuously.
    At ``progress >= end`` every schedule returns exactly ``final``.
    """
    if not (0.0 <= final < 1.0):
        raise TechniqueError(f"final sparsity {final} is outside [0, 1)")
    if not (0.0 <= start <= end <= 1.0):
        raise TechniqueError(f"schedule needs 0 <= start <= end <= 1, got start={start}, end={end}")
    if kind == "one_shot":
        return final if progress >= start else 0.0
    if kind not in SCHEDULES:
        raise TechniqueError(f"unknown schedule {kind!r}; known: {', '.join(sorted(SCHEDULES))}")
    if progress >= end:
        return final
    if progress < start:
        return 0.0
    q = (progress - start) / (end - start)
    if steps > 0:
        q = math.floor(q * steps + 1e-9) / steps
    if kind == "linear":
        return final * q
    if kind == "cubic":
        return final * (1.0 - (1.0 - q) ** 3)
    return final * (1.0 - math.exp(-_EXP_RATE * q)) / (1.0 - math.exp(-_EXP_RATE))
