"""The plots (matplotlib) and the HTML page of a run: ``pareto.png``, ``report.html`` and the PNGs beside it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import optuna
import pandas as pd

from .pareto import pareto_mask
from .report import (
    applicability_table,
    coverage_table,
    failures_table,
    front_table,
    layer_table,
    metric_sign,
    study_hypervolume,
    trials_frame,
    write_trials_table,
)
from .report_profiles import profiles_html
from .rundir import PARETO_PNG, REPORT_HTML, TRIALS_CSV, write_atomic


def plot_pareto(study: optuna.Study, run_dir: Path) -> Path:
    """accuracy vs latency and accuracy vs size: feasible, infeasible, Pareto and the baseline."""
    plt = _plt()
    df = trials_frame(study)
    done = df[df.state == "COMPLETE"]
    base = study.user_attrs.get("baseline") or {}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, (x, label) in zip(
        axes, [("latency_ms", "median latency (ms)"), ("size_bytes", "artifact size (bytes)")], strict=True
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
    ("size_bytes", "metric", "artifact size (bytes)", "metric of the artifact"),
    ("latency_ms", "size_bytes", "latency (ms)", "artifact size (bytes)"),
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


def _img(path: Path) -> str:
    import base64

    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img alt="{Path(path).stem}" src="data:image/png;base64,{data}">'


def _table(df: pd.DataFrame, empty: str) -> str:
    if not len(df):
        return f"<p><em>{empty}</em></p>"
    return df.to_html(index=False, na_rep="", float_format=lambda v: f"{v:.4g}", border=0, classes="t")


def _applicability_html(study: optuna.Study) -> str:
    from html import escape

    data = study.user_attrs.get("applicability")
    cov = study.user_attrs.get("coverage")
    if data is None and cov is None:
        return "<p><em>not checked (a study made before the applicability check)</em></p>"
    out = ""
    if data is not None:
        n, bad = len(data.get("checks", [])), len(applicability_table(study))
        out += (
            f"<p>{n} (technique, layer) pairs checked on the model at their harshest setting in "
            f"{data.get('seconds', 0):.1f} s ({data.get('lowerings', 0)} lowerings); {bad} removed from "
            "the search space:</p>"
            + _table(applicability_table(study), "every pair applies")
            + "".join(f"<p>warning: {escape(w)}</p>" for w in data.get("interactions", []))
        )
    if cov is not None:
        macs = cov.get("macs_share")
        macs = f" and {macs:.1%} of its multiply-accumulates (batch 1)" if macs is not None else ""
        out += (
            f"<h3>Coverage</h3><p>The search can change {cov['params_share']:.1%} of the model's parameters "
            f"({cov['params_touched']:,} of {cov['params_total']:,}){escape(macs)}. It cannot change:</p>"
            + _table(coverage_table(study), "nothing: every parameter is in a searched layer")
        )
    return out


def _kept_summary(df: pd.DataFrame) -> str:
    """How many completed trials kept their fine-tuned model, how many the post-training one."""
    done = df[(df.state == "COMPLETE") & (df.kept != "")] if len(df) else df
    if not len(done):
        return "not compared (finetune.keep_better off, no fine-tuning or no held-out part)"
    n = done.kept.value_counts().to_dict()
    return (
        f"fine-tuned in {n.get('finetuned', 0)}, post-training in {n.get('post_training', 0)} of "
        f"{len(done)} trials (the better on the held-out part of the training split)"
    )


def write_html(study: optuna.Study, run_dir: Path, first_line: str = "") -> Path:
    """``report.html``: summary, projections, per-layer view, trials, failures, hypervolume (PNGs beside it)."""
    from html import escape

    run_dir = Path(run_dir)
    pngs = {
        "projections": plot_projections(study, run_dir),
        "layers": plot_layers(study, run_dir),
        "hypervolume": plot_hypervolume(study, run_dir),
    }
    df = trials_frame(study)
    states = df.state.value_counts().to_dict() if len(df) else {}
    base = study.user_attrs.get("baseline") or {}
    env = study.user_attrs.get("environment") or {}
    cfg = study.user_attrs.get("config") or {}
    hv = study_hypervolume(study)
    lt = layer_table(study)
    per_layer = ""
    for trial, group in lt.groupby("trial", sort=False):
        per_layer += f"<h3>trial {trial}</h3>" + _table(group.drop(columns="trial"), "")
    cols = [c for c in df.columns if not c.startswith("param.")] if len(df) else []
    summary = {
        "study": study.study_name,
        "task": (cfg.get("task") or {}).get("name", ""),
        "backend / device": f"{env.get('backend', '')} / {env.get('device', '')} ({env.get('device_name', '')})",
        "trials": ", ".join(f"{v} {k.lower()}" for k, v in states.items()) or "none",
        "baseline": (
            f"{base.get('metric_name', 'metric')} {base['metric']:.4f}, {base['latency_ms']:.4f} ms, {base['size_bytes']} bytes"
            if base
            else "not measured"
        ),
        "budgets": ", ".join(f"{k} = {v}" for k, v in (cfg.get("budgets") or {}).items() if v is not None)
        or "none",
        "hypervolume (last)": f"{hv[-1][1]:.4f}" if hv else "n/a",
        "kept model": _kept_summary(df),
    }
    body = f"""<!doctype html><html><head><meta charset="utf-8"><title>autocompress: {escape(study.study_name)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1400px}} img{{max-width:100%}}
table.t{{border-collapse:collapse;font-size:12px}} table.t td,table.t th{{border:1px solid #ccc;padding:2px 6px}}
dt{{font-weight:bold;float:left;width:12em}} dd{{margin-left:13em}}</style></head><body>
<h1>autocompress report: {escape(study.study_name)}</h1>
<h2>Summary</h2><dl>{"".join(f"<dt>{escape(k)}</dt><dd>{escape(str(v))}</dd>" for k, v in summary.items())}</dl>
<h2>Applicability (checked before the first trial)</h2>{_applicability_html(study)}
<h2>Profiles: measured latency and accuracy per layer x setting</h2>{profiles_html(study, run_dir)}
<h2>Pareto front</h2>{_table(front_table(study), "no feasible completed trial yet")}
<h2>Projections</h2><p>Blue: feasible; grey x: over a budget; red rings: Pareto (3 objectives); black star: baseline.</p>
{_img(pngs["projections"])}
<h2>Per-layer choices of the Pareto models</h2>{_img(pngs["layers"])}{per_layer or "<p><em>no Pareto model yet</em></p>"}
<h2>Hypervolume history</h2>{_img(pngs["hypervolume"])}
<h2>Failures by reason</h2>{_table(failures_table(study), "no failed trial")}
<h2>All trials</h2>{_table(df[cols] if len(df) else df, "no trial yet")}
</body></html>"""
    path = run_dir / REPORT_HTML
    write_atomic(path, lambda p: p.write_text(first_line + body))
    return path


def report_digest(study: optuna.Study, run_dir: Path) -> str:
    """What the report is drawn from: every trial's state, values and attributes, the study's attributes,
    the run folder's JSON files (their size and time) and this module's file time."""
    trials = [
        (t.number, t.state.name, t.values, t.params, t.user_attrs, str(t.datetime_complete))
        for t in study.get_trials(deepcopy=False)
    ]
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in Path(run_dir).glob("*.json"))
    code = Path(__file__).stat().st_mtime_ns  # a changed report module draws again
    blob = json.dumps([code, trials, study.user_attrs, files], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


_DIGEST_LINE = "<!-- autocompress report of {} -->\n"


def write_report(study: optuna.Study, run_dir: Path) -> dict[str, Path]:
    """trials.csv, pareto.png and report.html (with projections.png, layers.png, hypervolume.png).

    Drawn again only when something it shows changed (report.html's first line holds the digest of what
    it was drawn from): a finished study run again, or reported twice, costs no plotting."""
    run_dir = Path(run_dir)
    paths = {"trials": run_dir / TRIALS_CSV, "plot": run_dir / PARETO_PNG, "html": run_dir / REPORT_HTML}
    digest = report_digest(study, run_dir)
    first_line = _DIGEST_LINE.format(digest)
    if all(p.exists() for p in paths.values()):
        with paths["html"].open() as f:
            if f.readline() == first_line:
                return paths
    return {
        "trials": write_trials_table(study, run_dir),
        "plot": plot_pareto(study, run_dir),
        "html": write_html(study, run_dir, first_line),
    }
