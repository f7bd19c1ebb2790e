"""Tables (pandas) and plots (matplotlib) of a run, re-rendered from the Optuna storage."""

from __future__ import annotations

import os
from pathlib import Path

import optuna
import pandas as pd
from optuna.trial import TrialState

from .pareto import pareto_mask


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    """One row per trial: state, objectives, derived ratios, feasibility, Pareto flag, params."""
    front = {t.number for t in study.best_trials}
    rows = []
    for t in study.get_trials(deepcopy=False):
        ua = t.user_attrs
        feasible = all(v <= 0 for v in t.constraints.values()) if t.state == TrialState.COMPLETE else None
        row = {
            "trial": t.number,
            "state": t.state.name,
            "accuracy": ua.get("accuracy"),
            "latency_ms": ua.get("latency_ms"),
            "latency_p90_ms": ua.get("latency_p90_ms"),
            "size_bytes": ua.get("size_bytes"),
            "speedup": ua.get("speedup"),
            "size_ratio": ua.get("size_ratio"),
            "accuracy_drop": ua.get("accuracy_drop"),
            "feasible": feasible,
            "pareto": t.number in front,
            "duration_s": t.duration.total_seconds() if t.duration else None,
            "fail_reason": ua.get("fail_reason", ""),
            "fail_category": ua.get("fail_category", ""),
            "warm_start": ua.get("warm_start", ""),
        }
        row.update({f"param.{k}": v for k, v in sorted(t.params.items())})
        rows.append(row)
    return pd.DataFrame(rows)


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    write(tmp)
    os.replace(tmp, path)


def write_trials_table(study: optuna.Study, run_dir: Path) -> Path:
    path = Path(run_dir) / "trials.csv"
    df = trials_frame(study)
    _atomic_write(path, lambda p: df.to_csv(p, index=False))
    return path


def plot_pareto(study: optuna.Study, run_dir: Path) -> Path:
    """accuracy vs latency and accuracy vs size: feasible, infeasible, Pareto and the baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = trials_frame(study)
    done = df[df.state == "COMPLETE"]
    base = study.user_attrs.get("baseline") or {}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, (x, label) in zip(
        axes, [("latency_ms", "median latency (ms)"), ("size_bytes", "artifact size (bytes)")], strict=True
    ):
        if len(done):
            feas = done[done.feasible.fillna(True).astype(bool)]
            infeas = done[~done.feasible.fillna(True).astype(bool)]
            ax.scatter(feas[x], feas.accuracy, c="tab:blue", alpha=0.6, label="feasible trial")
            ax.scatter(
                infeas[x],
                infeas.accuracy,
                c="tab:gray",
                marker="x",
                alpha=0.6,
                label="infeasible (over budget)",
            )
            front = done[done.pareto].copy()
            # the 2-D projection of the 3-D front, for the line
            proj = (
                front[
                    pareto_mask(
                        front[["accuracy", x]].rename(columns={x: "cost"}).to_dict("records"),
                        {"accuracy": 1, "cost": -1},
                    )
                ].sort_values(x)
                if len(front)
                else front
            )
            ax.scatter(
                front[x],
                front.accuracy,
                facecolors="none",
                edgecolors="tab:red",
                s=120,
                linewidths=2,
                label="Pareto (3 objectives)",
            )
            if len(proj):
                ax.step(proj[x], proj.accuracy, where="post", c="tab:red", alpha=0.5)
        if base:
            ax.scatter([base[x]], [base["accuracy"]], marker="*", s=250, c="black", label="baseline")
        ax.set_xlabel(label)
        ax.set_ylabel("accuracy (of the artifact)")
        ax.grid(alpha=0.3)
    axes[1].set_xscale("log")
    axes[0].legend(loc="lower right", fontsize=8)
    fig.suptitle(
        f"{study.study_name}: {len(done)} completed trials, {int(done.pareto.sum()) if len(done) else 0} on the front"
    )
    fig.tight_layout()
    path = Path(run_dir) / "pareto.png"
    _atomic_write(path, lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)
    return path


def front_table(study: optuna.Study) -> pd.DataFrame:
    df = trials_frame(study)
    cols = ["trial", "accuracy", "accuracy_drop", "latency_ms", "speedup", "size_bytes", "size_ratio"]
    return df[df.pareto][cols].sort_values("accuracy", ascending=False) if len(df) else df


def _failed_with_category(study: optuna.Study) -> pd.DataFrame:
    df = trials_frame(study)
    if not len(df):
        return pd.DataFrame(columns=["trial", "category", "fail_reason"])
    failed = df[df.state == "FAIL"].copy()
    older = failed.fail_reason.str.split(":").str[0]  # trials recorded before categories existed
    failed["category"] = failed.fail_category.where(failed.fail_category != "", older)
    return failed


def failures_by_reason(study: optuna.Study) -> pd.Series:
    """Number of failed trials per failure category (``timeout``, ``non-finite loss``, ...)."""
    return _failed_with_category(study).category.value_counts()


def failures_table(study: optuna.Study) -> pd.DataFrame:
    """One row per failure category: count, trial numbers and the first trial's one-line reason."""
    failed = _failed_with_category(study)
    rows = [
        {
            "category": cat,
            "count": len(group),
            "trials": ", ".join(str(n) for n in group.trial),
            "example": group.fail_reason.iloc[0],
        }
        for cat, group in failed.groupby("category", sort=False)
    ]
    return pd.DataFrame(rows, columns=["category", "count", "trials", "example"]).sort_values(
        "count", ascending=False, kind="stable"
    )


def write_report(study: optuna.Study, run_dir: Path) -> dict[str, Path]:
    """trials.csv and pareto.png in ``run_dir``."""
    return {"trials": write_trials_table(study, run_dir), "plot": plot_pareto(study, run_dir)}
