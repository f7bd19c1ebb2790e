"""Sensitivity analysis: per layer, the accuracy drop of each compression setting on its own.

Each setting is applied to one layer at a time, without fine-tuning, lowered by the study's backend,
and the *artifact's* accuracy is measured (the same path as a trial, minus fine-tuning and timing).
The table is cached in the run folder (``sensitivity.json``), keyed by the teacher and the settings.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from .objective import RunContext, write_json
from .pipeline import compress
from .plan import LayerPlan, Plan

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
    teacher = (
        (ctx.run_dir / "teacher.safetensors").read_bytes()
        if (ctx.run_dir / "teacher.safetensors").exists()
        else b""
    )
    blob = json.dumps([list(s) for s in settings]).encode() + hashlib.sha256(teacher).digest()
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
    cache = ctx.run_dir / "sensitivity.json"
    key = _key(ctx, settings)
    if use_cache and cache.exists():
        data = json.loads(cache.read_text())
        if data.get("key") == key:
            log(f"sensitivity: cached in {cache}")
            return pd.DataFrame(data["rows"])
    base_acc = ctx.baseline["accuracy"]
    x, y = ctx.task.test
    rows = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ac-sens-") as tmp:
        for info in ctx.inventory:
            for dim, value in settings:
                plan = Plan(layers={info.name: LayerPlan(**{dim: value})}, epochs=0, seed=ctx.config.seed)
                out = compress(ctx.task, ctx.teacher, plan, reduce_range=ctx.backend.reduce_range)
                applied = not (
                    dim == "rank_ratio" and info.name in out.notes and "not" in out.notes[info.name]
                )
                art = ctx.backend.lower(
                    out.model,
                    ctx.task.example_inputs(),
                    out.precisions,
                    Path(tmp) / f"{info.name}-{dim}-{value}",
                    ctx.task.calibration_inputs(),
                )
                acc = ctx.backend.evaluate(art, x.numpy(), y.numpy(), ctx.task.score)
                rows.append(
                    {
                        "layer": info.name,
                        "dimension": dim,
                        "value": value,
                        "setting": setting_label(dim, value),
                        "accuracy": acc,
                        "accuracy_drop": base_acc - acc,
                        "applied": applied,
                        "note": out.notes.get(info.name, ""),
                    }
                )
            log(f"sensitivity: {info.name} done ({time.perf_counter() - t0:.0f} s)")
    write_json(cache, {"key": key, "baseline_accuracy": base_acc, "rows": rows})
    return pd.DataFrame(rows)


def ranking(df: pd.DataFrame) -> pd.Series:
    """Layers from most to least sensitive: mean accuracy drop over the applied settings."""
    return df[df.applied].groupby("layer", sort=False).accuracy_drop.mean().sort_values(ascending=False)


def table(df: pd.DataFrame) -> pd.DataFrame:
    """Accuracy drop, layers x settings (in inventory and setting order)."""
    t = df.pivot_table(index="layer", columns="setting", values="accuracy_drop", sort=False)
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
    fig.colorbar(im, ax=ax, label="accuracy drop (no fine-tuning)")
    ax.set_title("per-layer sensitivity of the artifact's accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def gentle_plan(df: pd.DataFrame, max_drop: float) -> dict[str, dict[str, float]]:
    """Per layer, the harshest value of each dimension whose drop alone stays within ``max_drop``."""
    harsh = {"bits": min, "sparsity": max, "rank_ratio": min}
    out: dict[str, dict[str, float]] = {}
    for (layer, dim), g in df[df.applied & (df.accuracy_drop <= max_drop)].groupby(
        ["layer", "dimension"], sort=False
    ):
        out.setdefault(layer, {})[dim] = harsh[dim](g.value)
    return out
