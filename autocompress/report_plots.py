"""The plots of a run (matplotlib): ``pareto.png``, and the projections, per-layer choices and hypervolume
history that ``report.html`` shows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import optuna
import pandas as pd

from .pareto import pareto_mask
from .report import layer_table, metric_sign, study_hypervolume, trials_frame
from .rundir import PARETO_PNG, write_atomic


def plot_pareto(study: optuna.Study, run_dir: Path) -> Path:
    """accuracy vs latency and accuracy vs size: feasible, infeasible, Pareto and the baseline."""
    plt = _plt()
    df = trials_frame(study)
    done = df[df.state == "COMPLETE"]
    base = study.user_attrs.get("baseline") or {}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, (x, label) in zip(
        axes, [("latency_ms", "median latency (ms)"), ("size_bytes", "artifact size")], strict=True
    ):
        _plane(ax, done, base, x, "metric")
        front = done[done.pareto] if len(done) else done
        if len(front):  # the 2-D projection of the 3-D front, for the line
            proj = front[
                pareto_mask(
                    front[["metric", x]].rename(columns={x: "cost"}).to_dict("records"),
                    {"metric": metric_sign(study), "cost": -1},
                )
            ].sort_values(x)
            ax.step(proj[x], proj.metric, where="post", c="tab:red", alpha=0.5)
        ax.set_xlabel(label)
        _units(ax, x, "metric")
        ax.set_ylabel(f"{base.get('metric_name', 'metric')} (of the artifact)")
    axes[1].set_xscale("log")
    axes[0].legend(loc="lower right", fontsize=8)
    fig.suptitle(
        f"{study.study_name}: {len(done)} completed trials, {int(done.pareto.sum()) if len(done) else 0} on the front"
    )
    fig.tight_layout()
    path = Path(run_dir) / PARETO_PNG
    write_atomic(path, lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)
    return path


PLANES = [  # (x, y, label x, label y) of the three 2-D projections of the front
    ("latency_ms", "metric", "latency (ms, side by side with the baseline)", "metric of the artifact"),
    ("size_bytes", "metric", "artifact size", "metric of the artifact"),
    ("latency_ms", "size_bytes", "latency (ms)", "artifact size"),
]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    write_atomic(path, lambda p: fig.savefig(p, dpi=100, format="png"))
    _plt().close(fig)
    return path


def _units(ax, x: str, y: str) -> None:
    """Byte axes in B / kB / MB (as the report's tables), not raw byte counts."""
    from matplotlib.ticker import FuncFormatter

    from .units import fmt_bytes

    for axis, name in ((ax.xaxis, x), (ax.yaxis, y)):
        if name == "size_bytes":
            axis.set_major_formatter(FuncFormatter(lambda v, _: fmt_bytes(v)))
            axis.set_minor_formatter(FuncFormatter(lambda v, _: ""))


def _plane(ax, done: pd.DataFrame, base: dict, x: str, y: str) -> None:
    """One 2-D projection: feasible, infeasible (over a budget), Pareto (3 objectives), baseline."""
    if len(done):
        feasible = done.feasible.fillna(True).astype(bool)
        ax.scatter(done[feasible][x], done[feasible][y], c="tab:blue", alpha=0.6, label="feasible trial")
        ax.scatter(
            done[~feasible][x],
            done[~feasible][y],
            c="tab:gray",
            marker="x",
            alpha=0.6,
            label="infeasible (over budget)",
        )
        front = done[done.pareto]
        ax.scatter(
            front[x],
            front[y],
            facecolors="none",
            edgecolors="tab:red",
            s=120,
            linewidths=2,
            label="Pareto (3 objectives)",
        )
    if base:
        ax.scatter([base[x]], [base[y]], marker="*", s=250, c="black", label="baseline")
    ax.grid(alpha=0.3)


def plot_projections(study: optuna.Study, run_dir: Path) -> Path:
    """The three 2-D projections of accuracy / latency / size: feasible, infeasible, Pareto, baseline."""
    plt = _plt()
    df = trials_frame(study)
    done = df[df.state == "COMPLETE"] if len(df) else df
    base = study.user_attrs.get("baseline") or {}
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    for ax, (x, y, lx, ly) in zip(axes, PLANES, strict=True):
        _plane(ax, done, base, x, y)
        ax.set(xlabel=lx, ylabel=ly)
        _units(ax, x, y)
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"{study.study_name}: projections of the 3-objective front")
    fig.tight_layout()
    return _save(fig, Path(run_dir) / "projections.png")


def plot_layers(study: optuna.Study, run_dir: Path) -> Path:
    """Heat maps (Pareto trial x layer) of the chosen bits, sparsity and rank ratio."""
    plt = _plt()
    lt = layer_table(study)
    rows = max(1, lt.trial.nunique() if len(lt) else 1)
    # the layer names stand at 60 degrees under the maps: about 0.05 inch of height per character at 7 pt
    longest = max((len(str(n)) for n in lt.layer.unique()), default=0) if len(lt) else 0
    fig, axes = plt.subplots(1, 3, figsize=(16, 1.6 + 0.35 * rows + 0.05 * longest))
    for ax, (col, cmap, title) in zip(
        axes,
        [
            ("bits", "viridis", "bits (32 = float)"),
            ("sparsity", "Reds", "sparsity"),
            ("rank_ratio", "Blues_r", "rank ratio"),
        ],
        strict=True,
    ):
        if len(lt):
            grid = lt.pivot(index="trial", columns="layer", values=col).astype(float)
            grid = grid.loc[[n for n in dict.fromkeys(lt.trial)]]
            im = ax.imshow(grid.values, aspect="auto", cmap=cmap)
            ax.set_xticks(range(grid.shape[1]), grid.columns, rotation=60, ha="right", fontsize=7)
            ax.set_yticks(range(grid.shape[0]), [f"trial {n}" for n in grid.index], fontsize=7)
            for (i, j), v in np.ndenumerate(grid.values):
                ax.text(
                    j,
                    i,
                    f"{v:g}",
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white" if col == "bits" else "black",
                )
            fig.colorbar(im, ax=ax, fraction=0.04)
        ax.set_title(title)
    fig.suptitle("per-layer choices of each Pareto model")
    fig.tight_layout()
    return _save(fig, Path(run_dir) / "layers.png")


def plot_hypervolume(study: optuna.Study, run_dir: Path) -> Path:
    from .pareto import HV_REFERENCE

    plt = _plt()
    hv = study_hypervolume(study)
    fig, ax = plt.subplots(figsize=(7, 3.6))
    if hv:
        ax.step([n for n, _ in hv], [v for _, v in hv], where="post", c="tab:purple")
    ax.set(
        xlabel="trial",
        ylabel="hypervolume (normalized)",
        title=f"hypervolume of the feasible trials; reference (drop, latency ratio, size ratio) = {HV_REFERENCE}",
    )
    ax.title.set_fontsize(8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, Path(run_dir) / "hypervolume.png")
