"""Pareto front, feasibility and pick-under-budget (pure functions over metric records)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# objective name -> +1 maximize / -1 minimize ("metric" is the task's metric: see objectives_for)
OBJECTIVES: dict[str, int] = {"metric": +1, "latency_ms": -1, "size_bytes": -1}


def objectives_for(metric_sign: int) -> dict[str, int]:
    """The objectives of a study whose metric is higher-is-better (+1) or lower-is-better (-1)."""
    return {**OBJECTIVES, "metric": 1 if metric_sign > 0 else -1}


def metric_drop(value: float, baseline: float, sign: int) -> float:
    """How much worse ``value`` is than ``baseline`` in the metric's own units (> 0 = worse)."""
    return (baseline - value) * sign


def relative_drop(drop: float, baseline: float) -> float:
    """A drop as a fraction of the baseline's magnitude (0.01 = 1% worse)."""
    return drop / max(abs(baseline), 1e-12)


def _as_minimization(points: Sequence[dict], objectives: dict[str, int]) -> np.ndarray:
    return np.array([[-sign * float(p[k]) for k, sign in objectives.items()] for p in points], dtype=float)


def pareto_mask(points: Sequence[dict], objectives: dict[str, int] = OBJECTIVES) -> list[bool]:
    """True for each point that no other point dominates (ties: equal points are all kept)."""
    if not points:
        return []
    a = _as_minimization(points, objectives)
    le = (a[:, None, :] <= a[None, :, :]).all(axis=2)
    lt = (a[:, None, :] < a[None, :, :]).any(axis=2)
    dominated = (le & lt).any(axis=0)  # dominated[j]: some i dominates j
    return [not d for d in dominated]


# A budget met exactly is met: a metric drop of 1 point computed as 0.988 - 0.978 is
# 0.010000000000000009 in floating point. The one rule of every budget check (feasibility and the
# front through :func:`constraint_values`, ``pick`` through :func:`within_budgets`): a value exceeds its
# budget only by more than BUDGET_ATOL + BUDGET_RTOL x |budget|, far below any difference a
# measurement can show.
BUDGET_RTOL = 1e-9
BUDGET_ATOL = 1e-12

# budget name -> the metrics field it bounds
BUDGET_FIELDS = {
    "max_metric_drop": "metric_drop",
    "max_metric_drop_rel": "metric_drop_rel",
    "max_latency_ms": "latency_ms",
    "max_size_bytes": "size_bytes",
}


def over_budget(value: float, budget: float) -> float:
    """How far ``value`` is above ``budget``, rounding forgiven: <= 0 when the budget is met."""
    return float(value) - float(budget) - (BUDGET_ATOL + BUDGET_RTOL * abs(float(budget)))


def constraint_values(m: dict, budgets: dict[str, float | None]) -> dict[str, float]:
    """Optuna constraint values (<= 0 is feasible) for each budget that is set (see :func:`over_budget`)."""
    return {
        field: over_budget(m[field], budgets[name])
        for name, field in BUDGET_FIELDS.items()
        if budgets.get(name) is not None
    }


def within_budgets(
    m: dict,
    *,
    max_latency_ms: float | None = None,
    max_size_bytes: float | None = None,
    max_metric_drop: float | None = None,
    max_metric_drop_rel: float | None = None,
) -> bool:
    """Whether metrics ``m`` meet every given budget (None = no budget), by :func:`constraint_values`."""
    budgets = {
        "max_latency_ms": max_latency_ms,
        "max_size_bytes": max_size_bytes,
        "max_metric_drop": max_metric_drop,
        "max_metric_drop_rel": max_metric_drop_rel,
    }
    return all(v <= 0 for v in constraint_values(m, budgets).values())


def pick(points: Sequence[dict], **budgets) -> dict | None:
    """The point with the best metric within budgets (then fastest, then smallest); None if none fits."""
    ok = [p for p in points if within_budgets(p, **budgets)]
    if not ok:
        return None
    return min(ok, key=lambda p: (p.get("metric_drop", -p["metric"]), p["latency_ms"], p["size_bytes"]))


def recommend(points: Sequence[dict], **budgets) -> dict | None:
    """The model to deploy among ``points`` within ``budgets``; None if none fits.

    With a metric budget (``max_metric_drop`` or ``max_metric_drop_rel``), the fastest point within every
    budget (then the smallest): the budget bounds what accuracy may be given up. Without one, the most
    accurate within the budgets (then the fastest), as :func:`pick` chooses.
    """
    ok = [p for p in points if within_budgets(p, **budgets)]
    if not ok:
        return None
    if budgets.get("max_metric_drop") is None and budgets.get("max_metric_drop_rel") is None:
        return pick(ok)
    return min(ok, key=lambda p: (p["latency_ms"], p["size_bytes"], p.get("metric_drop") or 0.0))


# Hypervolume of a run, in objectives normalized against its baseline artifact, all minimized:
# accuracy drop (points of 1), latency ratio (candidate / baseline, timed side by side) and size ratio.
# The reference point counts a model only when it loses less than 10 points and is both faster and
# smaller than the baseline; the volume is divided by the reference box's (0.1), so 1.0 would be a
# lossless model that takes no time and no bytes.
HV_REFERENCE: tuple[float, float, float] = (0.10, 1.0, 1.0)


def normalized_objectives(drop_rel: float, speedup: float, size_ratio: float):
    """(relative metric drop, latency ratio, size ratio), all to minimize (see :data:`HV_REFERENCE`)."""
    return (drop_rel, 1.0 / speedup, 1.0 / size_ratio)


def hypervolume_history(
    points: Sequence[Sequence[float] | None], reference: Sequence[float] = HV_REFERENCE
) -> list[float]:
    """Normalized hypervolume of the points seen so far, after each point (None adds nothing).

    ``points`` are normalized objectives (:func:`normalized_objectives`), in trial order; points outside
    the reference box (e.g. more than 10 points of accuracy lost) add nothing. Optuna's own
    hypervolume (:func:`autocompress.optuna_compat.hypervolume`) does the geometry.
    """
    from .optuna_compat import hypervolume

    ref = np.asarray(reference, dtype=float)
    box = float(np.prod(ref))
    seen: list[Sequence[float]] = []
    out: list[float] = []
    for p in points:
        if p is not None and all(v < r for v, r in zip(p, ref, strict=True)):
            seen.append(p)
        out.append(hypervolume(seen, ref) / box if seen else 0.0)
    return out
