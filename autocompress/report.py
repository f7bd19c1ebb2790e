"""Tables (pandas) of a run, re-rendered from the Optuna storage; the plots and the HTML page are in
:mod:`.report_html`."""

from __future__ import annotations

from pathlib import Path

import optuna
import pandas as pd
from optuna.trial import TrialState

from .rundir import TRIALS_CSV, write_atomic


def metric_sign(study: optuna.Study) -> int:
    """+1 when the study maximizes its metric (the first objective), -1 when it minimizes it."""
    return 1 if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else -1


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    """One row per trial: state, objectives, derived ratios, feasibility, Pareto flag, params."""
    front = {t.number for t in study.best_trials}
    rows = [_trial_row(t, front) for t in study.get_trials(deepcopy=False)]
    if not rows:  # a run stopped before its first trial: the same columns, no rows
        return pd.DataFrame([_trial_row(optuna.trial.create_trial(state=TrialState.FAIL), set())]).iloc[:0]
    return pd.DataFrame(rows)


def _trial_row(t: optuna.trial.FrozenTrial, front: set[int]) -> dict:
    ua = t.user_attrs
    feasible = all(v <= 0 for v in t.constraints.values()) if t.state == TrialState.COMPLETE else None
    row = {
        "trial": t.number,
        "state": t.state.name,
        "metric": ua.get("metric"),
        "latency_ms": ua.get("latency_ms"),
        "latency_p90_ms": ua.get("latency_p90_ms"),
        "size_bytes": ua.get("size_bytes"),
        "entropy_coded_bytes_lzma": ua.get("entropy_coded_bytes_lzma"),  # labelled: never the size objective
        "speedup": ua.get("speedup"),
        "size_ratio": ua.get("size_ratio"),
        "metric_drop": ua.get("metric_drop"),
        "feasible": feasible,
        "pareto": t.number in front,
        "duration_s": t.duration.total_seconds() if t.duration else None,
        "fail_reason": ua.get("fail_reason", ""),
        "fail_category": ua.get("fail_category", ""),
        "warm_start": ua.get("warm_start", ""),
        # finetune.keep_better: which model the artifact holds, and both held-out scores
        "kept": ua.get("kept", ""),
        "holdout_post_training": ua.get("holdout_post_training"),
        "holdout_finetuned": ua.get("holdout_finetuned"),
    }
    row.update({f"param.{k}": v for k, v in sorted(t.params.items())})
    return row


def write_trials_table(study: optuna.Study, run_dir: Path) -> Path:
    path = Path(run_dir) / TRIALS_CSV
    df = trials_frame(study)
    write_atomic(path, lambda p: df.to_csv(p, index=False))
    return path


def front_table(study: optuna.Study) -> pd.DataFrame:
    df = trials_frame(study)
    cols = ["trial", "metric", "metric_drop", "latency_ms", "speedup", "size_bytes", "size_ratio"]
    return df[df.pareto][cols].sort_values("metric_drop", ascending=True) if len(df) else df


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


def layer_table(study: optuna.Study) -> pd.DataFrame:
    """One row per (Pareto trial, layer): the layer's value of every reported per-layer field of the
    registered techniques (bits, sparsity and kind, rank ratio and mode, ...) and the pipeline's note."""
    from .registry import TECHNIQUES

    fields = [d.name for d in TECHNIQUES.dims() if d.report]
    rows = []
    for t in sorted(study.best_trials, key=lambda t: -t.values[0]):
        for layer, lp in sorted((t.user_attrs.get("plan") or {}).get("layers", {}).items()):
            note = (t.user_attrs.get("notes") or {}).get(layer, "")
            rows.append({"trial": t.number, "layer": layer, **{f: lp.get(f) for f in fields}, "note": note})
    return pd.DataFrame(rows, columns=["trial", "layer", *fields, "note"])


def study_hypervolume(study: optuna.Study) -> list[tuple[int, float]]:
    """(trial number, normalized hypervolume of the feasible trials so far), in trial order."""
    from .pareto import hypervolume_history, normalized_objectives

    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    points = []
    for t in trials:
        ua = t.user_attrs
        ok = (
            t.state == TrialState.COMPLETE
            and "speedup" in ua
            and "metric_drop_rel" in ua
            and all(v <= 0 for v in t.constraints.values())
        )
        points.append(
            normalized_objectives(ua["metric_drop_rel"], ua["speedup"], ua["size_ratio"]) if ok else None
        )
    return list(zip([t.number for t in trials], hypervolume_history(points), strict=True))


def applicability_table(study: optuna.Study) -> pd.DataFrame:
    """The (technique, layer) pairs removed from the space before the first trial, with the reason."""
    data = study.user_attrs.get("applicability") or {}
    cols = ["layer", "technique", "setting", "status", "stage", "reason", "removed"]
    rows = [c for c in data.get("checks", []) if c.get("status") != "ok"]
    return pd.DataFrame([{k: r.get(k, "") for k in cols} for r in rows], columns=cols)


def coverage_table(study: optuna.Study) -> pd.DataFrame:
    """The parts of the model the search cannot change: parameters, share and the reason."""
    cov = study.user_attrs.get("coverage") or {}
    cols = ["part", "type", "params", "share", "reason"]
    rows = [{k: r.get(k) for k in cols} for r in cov.get("untouched", [])]
    for r in rows:
        r["share"] = f"{r['share']:.1%}" if r["share"] is not None else ""
    return pd.DataFrame(rows, columns=cols)
