"""Sensitivity analysis: per layer, the accuracy drop of each compression setting on its own.

Each setting is applied to one layer at a time, without fine-tuning, lowered by the study's backend,
and the *artifact's* accuracy is measured (the same path as a trial, minus fine-tuning and timing).
The table is cached in the run folder (``sensitivity.json``), keyed by the teacher and the settings.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from .context import RunContext
from .pipeline import compress
from .plan import LayerPlan, Plan
from .registry import TECHNIQUES
from .rundir import SENSITIVITY, write_json
from .scratch import scratch_dir

# (dimension, value): what one layer is set to, everything else untouched
SETTINGS: tuple[tuple[str, float], ...] = (
    ("bits", 8),
    ("bits", 4),
    ("sparsity", 0.5),
    ("sparsity", 0.8),
    ("rank_ratio", 0.5),
    ("rank_ratio", 0.25),
)


def _key(ctx: RunContext, settings) -> str:
    from .tasks.base import weights_hash

    blob = json.dumps([list(s) for s in settings]).encode() + weights_hash(ctx.teacher).encode()
    blob += json.dumps(ctx.backend.capabilities(), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def setting_label(dimension: str, value: float) -> str:
    return {"bits": f"{int(value)}-bit", "sparsity": f"sparsity {value:g}", "rank_ratio": f"rank {value:g}"}[
        dimension
    ]


def analyze(
    ctx: RunContext, settings=SETTINGS, log: Callable[[str], None] = print, use_cache: bool = True
) -> pd.DataFrame:
    """One row per (layer, setting): the artifact's accuracy and its drop against the baseline."""
    cache = ctx.run_dir / SENSITIVITY
    key = _key(ctx, settings)
    if use_cache and cache.exists():
        data = json.loads(cache.read_text())
        if data.get("key") == key:
            log(f"sensitivity: cached in {cache}")
            return pd.DataFrame(data["rows"])
    base_acc = ctx.baseline["metric"]
    sign = ctx.metric.sign
    rows = []
    t0 = time.perf_counter()
    with scratch_dir("ac-sens-") as tmp:
        stored = getattr(ctx.backend, "stored_bits", None)
        grids = getattr(ctx.backend, "weight_granularity", {})  # e.g. ascend: Linear per tensor only
        kind_bits = getattr(ctx.backend, "bits_by_kind", {})  # e.g. embedding tables: float only
        for info in ctx.inventory:
            for dim, value in settings:
                if not TECHNIQUES.dim(dim).applies(info.kind):  # an embedding table takes bits only
                    continue
                held = kind_bits.get(info.kind, stored)
                if dim == "bits" and held is not None and value not in held:
                    rows.append(
                        {
                            "layer": info.name,
                            "dimension": dim,
                            "value": value,
                            "setting": setting_label(dim, value),
                            "metric": float("nan"),
                            "metric_drop": float("nan"),
                            "applied": False,
                            "note": f"backend {ctx.backend.name!r} does not store {int(value)}-bit "
                            + ("embedding tables" if info.kind == "Embedding" else "weights"),
                        }
                    )
                    continue
                grid = grids.get(info.kind, ())
                extra = (
                    {"quant_granularity": grid[0]} if dim == "bits" and grid and "channel" not in grid else {}
                )
                plan = Plan(
                    layers={info.name: LayerPlan(**{dim: value}, **extra)}, epochs=0, seed=ctx.config.seed
                )
                out = compress(ctx.task, ctx.teacher, plan, reduce_range=ctx.backend.reduce_range)
                applied = not (
                    dim == "rank_ratio" and info.name in out.notes and "not" in out.notes[info.name]
                )
                art = ctx.lower(out.model, Path(tmp) / f"{info.name}-{dim}-{value}", out.lowering)
                acc = ctx.score(art)
                rows.append(
                    {
                        "layer": info.name,
                        "dimension": dim,
                        "value": value,
                        "setting": setting_label(dim, value),
                        "metric": acc,
                        "metric_drop": (base_acc - acc) * sign,
                        "applied": applied,
                        "note": out.notes.get(info.name, ""),
                    }
                )
            log(f"sensitivity: {info.name} done ({time.perf_counter() - t0:.0f} s)")
    write_json(cache, {"key": key, "baseline_metric": base_acc, "rows": rows})
    return pd.DataFrame(rows)


def ranking(df: pd.DataFrame) -> pd.Series:
    """Layers from most to least sensitive: mean accuracy drop over the applied settings."""
    return df[df.applied].groupby("layer", sort=False).metric_drop.mean().sort_values(ascending=False)


def table(df: pd.DataFrame) -> pd.DataFrame:
    """Accuracy drop, layers x settings (in inventory and setting order)."""
    t = df.pivot_table(index="layer", columns="setting", values="metric_drop", sort=False)
    return t[[c for c in dict.fromkeys(df.setting) if c in t.columns]]


def heatmap(df: pd.DataFrame, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = table(df)
    fig, ax = plt.subplots(figsize=(1.3 * len(t.columns) + 2, 0.45 * len(t) + 1.6))
    im = ax.imshow(t.values, cmap="Reds", vmin=0, vmax=max(0.01, float(t.values.max())))
    ax.set_xticks(range(len(t.columns)), t.columns, rotation=30, ha="right")
    ax.set_yticks(range(len(t.index)), t.index)
    for i in range(len(t.index)):
        for j in range(len(t.columns)):
            ax.text(j, i, f"{t.values[i, j]:.3f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, label="metric drop (no fine-tuning)")
    ax.set_title("per-layer sensitivity of the artifact's metric")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def gentle_plan(df: pd.DataFrame, max_drop: float) -> dict[str, dict[str, float]]:
    """Per layer, the harshest value of each dimension whose drop alone stays within ``max_drop``."""
    harsh = {"bits": min, "sparsity": max, "rank_ratio": min}
    out: dict[str, dict[str, float]] = {}
    for (layer, dim), g in df[df.applied & (df.metric_drop <= max_drop)].groupby(
        ["layer", "dimension"], sort=False
    ):
        out.setdefault(layer, {})[dim] = harsh[dim](g.value)
    return out


# the direction in which each measured dimension gets harsher (a smaller bit width, more sparsity, a
# smaller rank ratio)
_HARSHER = {
    "bits": lambda v, m: v <= m,
    "sparsity": lambda v, m: v >= m,
    "rank_ratio": lambda v, m: v <= m,
}
_MILDEST = {"bits": max, "sparsity": min, "rank_ratio": max}


def narrow_domains(space, inventory, df: pd.DataFrame, max_drop: float) -> dict[str, dict]:
    """Per-layer domains without the choices that cost more than ``max_drop`` accuracy on their own.

    A choice is removed when a measured setting of that layer and dimension dropped the artifact's
    accuracy by more than ``max_drop`` and the choice is at least as harsh (e.g. 4-bit failing removes
    4, 3 and 2 bits; sparsity 0.8 failing removes 0.8 and 0.9). Layers sharing a parameter (groups) lose
    a choice when any of them does. A domain is never emptied: its mildest choice stays. Searched ranges
    shrink at their harsh end to the harshest measured value still within ``max_drop`` (or collapse to
    the mild end). Fixed dimensions and dimensions the analysis does not measure are left alone.

    Returns:
        Optuna parameter name -> the narrowed :class:`~autocompress.space.Param` as a dict, only for
        the parameters that changed (what :meth:`SearchSpace.narrow` and the study's user attrs take).
    """
    ok = df[df.applied]
    failing: dict[tuple[str, str], list[float]] = {}
    passing: dict[tuple[str, str], list[float]] = {}
    for row in ok.itertuples():
        bucket = failing if row.metric_drop > max_drop else passing
        bucket.setdefault((row.layer, row.dimension), []).append(float(row.value))
    domains, members = _searched(space, inventory)
    out: dict[str, dict] = {}
    for name, (dim, p) in domains.items():
        harsh = _HARSHER[dim]
        fails = [m for layer in members[name] for m in failing.get((layer, dim), [])]
        if not fails:
            continue
        if p.choices is not None:
            kept = [v for v in p.choices if not any(harsh(v, m) for m in fails)]
            if not kept:
                kept = [_MILDEST[dim](p.choices)]
            if kept != list(p.choices):
                out[name] = {"choices": kept}
            continue
        passes = [m for layer in members[name] for m in passing.get((layer, dim), [])]
        allowed = [m for m in passes if not any(harsh(m, f) for f in fails) and p.low <= m <= p.high]
        mild_end = p.low if dim == "sparsity" else p.high
        bound = (max(allowed) if dim == "sparsity" else min(allowed)) if allowed else mild_end
        if p.step:  # stay on the range's grid, on the mild side
            n = (bound - p.low) / p.step
            n = math.floor(n + 1e-9) if dim == "sparsity" else math.ceil(n - 1e-9)
            bound = p.low + n * p.step
        low, high = (p.low, bound) if dim == "sparsity" else (bound, p.high)
        if (low, high) != (p.low, p.high):
            out[name] = {"low": low, "high": high, "step": p.step, "log": p.log and low > 0}
    return out


def _searched(space, inventory) -> tuple[dict[str, tuple[str, object]], dict[str, list[str]]]:
    """Optuna parameter name -> (dimension, Param) of the searched measured dimensions, and its layers."""
    from .registry import TECHNIQUES

    domains: dict[str, tuple[str, object]] = {}
    members: dict[str, list[str]] = {}
    for info in inventory:
        for dim, p in space.layer_params(info).items():
            if dim not in _HARSHER or p.fixed is not None:
                continue
            name = f"{TECHNIQUES.dim(dim).prefix}.{space.group_of(info.name)}"
            domains.setdefault(name, (dim, p))
            members.setdefault(name, []).append(info.name)
    return domains, members


def narrowing_summary(space, inventory, narrowed: dict[str, dict], max_drop: float) -> str:
    """One line: which domains the sensitivity narrowing changed (call before applying it)."""
    if not narrowed:
        return f"sensitivity narrowing (max drop {max_drop:g}): every searched choice stays"
    from .space import Param

    domains, _ = _searched(space, inventory)
    parts = [f"{name} {_show(domains[name][1])} -> {_show(Param(**new))}" for name, new in narrowed.items()]
    return f"sensitivity narrowing (max drop {max_drop:g}): {len(narrowed)} domains narrowed: " + "; ".join(
        parts
    )


def _show(p) -> str:
    if p.choices is not None:
        return "{" + ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in p.choices) + "}"
    return f"[{p.low:g}, {p.high:g}]"
