"""The report's profile sections: the measured latency profile and the accuracy profile (per layer x
setting, tables and heat maps, from ``latency_profile.json``), and the planned trials with their
predicted and measured figures (from the trials' ``planned`` user attrs)."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pandas as pd
from optuna.trial import TrialState

from .rundir import LATENCY_PROFILE, write_atomic

PROFILE_PNG = "profile.png"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _img(path: Path) -> str:
    import base64

    return (
        f'<img alt="{path.stem}" src="data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}">'
    )


def _table(df: pd.DataFrame, empty: str) -> str:
    if not len(df):
        return f"<p><em>{empty}</em></p>"
    return df.to_html(index=False, na_rep="", float_format=lambda v: f"{v:.4g}", border=0, classes="t")


def read_profile(run_dir: Path) -> dict | None:
    path = Path(run_dir) / LATENCY_PROFILE
    return json.loads(path.read_text()) if path.exists() else None


def profile_frame(profile: dict) -> pd.DataFrame:
    """One row per (layer, setting): speedup, latency, metric drop, size ratio, how it was timed."""
    cols = [
        "layer",
        "setting",
        "status",
        "speedup",
        "latency_ms",
        "metric_drop",
        "size_ratio",
        "timed",
        "note",
    ]
    return pd.DataFrame([{c: r.get(c) for c in cols} for r in profile.get("rows", [])], columns=cols)


def profile_grid(profile: dict, value: str) -> pd.DataFrame:
    """Layers x settings of ``value`` (``speedup`` or ``metric_drop``), in profile order."""
    df = profile_frame(profile)
    df = df[df.status == "ok"]
    if not len(df):
        return pd.DataFrame()
    grid = df.pivot_table(index="layer", columns="setting", values=value, sort=False)
    return grid[[c for c in dict.fromkeys(df.setting) if c in grid.columns]]


def plot_profile(profile: dict, run_dir: Path) -> Path | None:
    """Two heat maps: the speedup of the whole artifact and the metric drop, per layer x setting."""
    grids = [(profile_grid(profile, v), v) for v in ("speedup", "metric_drop")]
    if grids[0][0].empty:
        return None
    plt = _plt()
    rows, cols = grids[0][0].shape
    fig, axes = plt.subplots(1, 2, figsize=(2 * (1.1 * cols + 2.5), 0.45 * rows + 2))
    for ax, (grid, value) in zip(axes, grids, strict=True):
        vals = grid.values.astype(float)
        if value == "speedup":
            span = max(0.05, float(abs(pd.DataFrame(vals).stack() - 1).max()))
            im = ax.imshow(vals, cmap="RdYlGn", vmin=1 - span, vmax=1 + span, aspect="auto")
            title = "speedup of the whole artifact (only this layer changed)"
        else:
            im = ax.imshow(vals, cmap="Reds", vmin=0, vmax=max(0.01, float(pd.DataFrame(vals).stack().max())))
            title = "metric drop (no fine-tuning)"
        ax.set_xticks(range(cols), grid.columns, rotation=35, ha="right", fontsize=7)
        ax.set_yticks(range(rows), grid.index, fontsize=7)
        for i in range(rows):
            for j in range(cols):
                if vals[i, j] == vals[i, j]:
                    ax.text(
                        j,
                        i,
                        f"{vals[i, j]:.2f}" if value == "speedup" else f"{vals[i, j]:.3f}",
                        ha="center",
                        va="center",
                        fontsize=6,
                    )
        fig.colorbar(im, ax=ax, fraction=0.04)
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path = Path(run_dir) / PROFILE_PNG
    write_atomic(path, lambda p: fig.savefig(p, dpi=100, format="png"))
    plt.close(fig)
    return path


def planned_table(study: optuna.Study) -> pd.DataFrame:
    """One row per planned trial: its trade-off, predicted and measured speedup, size ratio and drop."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        p = t.user_attrs.get("planned")
        if not p:
            continue
        ua = t.user_attrs if t.state == TrialState.COMPLETE else {}
        row = {"trial": t.number, "plan": p.get("name", ""), "state": t.state.name}
        for k in ("speedup", "size_ratio", "metric_drop"):
            row[f"{k} predicted"] = p.get(k)
            row[f"{k} measured"] = ua.get(k)
            row[f"{k} error"] = ua[k] - p[k] if k in ua and p.get(k) is not None else None
        row["choices"] = ", ".join(p.get("choices", []))
        row["merged"] = "; ".join(p.get("merged", []))
        rows.append(row)
    return pd.DataFrame(rows)


def profiles_html(study: optuna.Study, run_dir: Path) -> str:
    """The report's section: profile cost, heat maps, the per-layer table, the planned trials."""
    from html import escape

    profile = read_profile(run_dir)
    planned = planned_table(study)
    if profile is None:
        out = "<p><em>no latency profile in this run folder (trials.planned_starts: 0, or a warm_start)</em></p>"
    else:
        te = profile.get("trial_equivalents")
        cost = f"{profile['seconds']:.1f} s" + (f" = {te:.2f} trial-equivalents" if te is not None else "")
        out = (
            f"<p>{len(profile['rows'])} (layer, setting) rows, each the teacher with only that change, lowered "
            f"and timed side by side with the baseline (whole-model rows: layer *); cost {escape(cost)} "
            f"({profile['lowerings']} lowerings, {profile['timed']} structures timed, {profile['cache_hits']} "
            f"from the latency cache, {profile['reused']} rows reused). Metric drops are before fine-tuning.</p>"
        )
        png = plot_profile(profile, run_dir)
        out += (_img(png) if png else "") + _table(profile_frame(profile), "no row")
    if len(planned):
        errs = planned.dropna(subset=["speedup error"])
        mean = (
            f" Mean absolute error over {len(errs)} completed: speedup {errs['speedup error'].abs().mean():.3f}, "
            f"size ratio {errs['size_ratio error'].abs().mean():.3f}, drop {errs['metric_drop error'].abs().mean():.4f}."
            if len(errs)
            else ""
        )
        out += (
            "<h4>Planned trials: predicted vs measured</h4><p>Predictions are the planner's (latency and size: products of one-layer ratios; drop: their sum, before "
            f"fine-tuning; the trials fine-tune).{escape(mean)}</p>" + _table(planned, "")
        )
    return out
