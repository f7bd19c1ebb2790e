"""Sparsity schedules: the sparsity a layer has at a given point of fine-tuning."""

from __future__ import annotations

from ..errors import TechniqueError


def sparsity_at(kind: str, final: float, start: float, end: float, progress: float) -> float:
    """Target sparsity at ``progress`` in [0, 1] of fine-tuning.

    - ``one_shot``: 0 before ``start``, ``final`` from ``start`` on.
    - ``linear``: rises linearly from 0 at ``start`` to ``final`` at ``end``.
    - ``cubic``: Zhu & Gupta (2017) gradual pruning, ``final * (1 - (1 - q)^3)`` with
      ``q = (progress - start) / (end - start)``: fast early, gentle near the end.

    At ``progress >= end`` every schedule returns exactly ``final``.
    """
    if not (0.0 <= final < 1.0):
        raise TechniqueError(f"final sparsity {final} is outside [0, 1)")
    if not (0.0 <= start <= end <= 1.0):
        raise TechniqueError(f"schedule needs 0 <= start <= end <= 1, got start={start}, end={end}")
    if kind == "one_shot":
        return final if progress >= start else 0.0
    if kind not in ("linear", "cubic"):
        raise TechniqueError(f"unknown schedule {kind!r}; known: cubic, linear, one_shot")
    if progress >= end:
        return final
    if progress < start:
        return 0.0
    q = (progress - start) / (end - start)
    return final * q if kind == "linear" else final * (1.0 - (1.0 - q) ** 3)
