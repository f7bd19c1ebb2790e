"""The HTML page of a run, ``report.html`` (the plots it shows are drawn by :mod:`.report_plots`)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import optuna
import pandas as pd

from .report import (
    applicability_table,
    coverage_table,
    failures_table,
    layer_table,
    study_hypervolume,
    trials_frame,
    write_trials_table,
)
from .report_answer import (
    Answer,
    answer_for,
    artifact_path,
    budgets_line,
    comparison,
    fmt_bytes,
    fmt_metric,
    fmt_ms,
    front_display,
    load_snippet,
    peers_note,
    slower_note,
    study_budgets,
)
from .report_plots import plot_hypervolume, plot_layers, plot_pareto, plot_projections
from .report_profiles import profiles_html
from .rundir import PARETO_PNG, REPORT_HTML, TRIALS_CSV, write_atomic


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
            f"<h4>Coverage</h4><p>The search can change {cov['params_share']:.1%} of the model's parameters "
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


CSS = """body{font-family:system-ui,sans-serif;margin:1.2em 2em;max-width:1400px;color:#222}
img{max-width:100%} h1{font-size:1.5em;margin:0 0 .2em} h2{margin:1.2em 0 .4em} .ctx{color:#555;margin:0}
table.t{border-collapse:collapse;font-size:13px} table.t td,table.t th{border:1px solid #ccc;padding:3px 8px}
table.t td{text-align:right} table.t th{background:#f3f3f3} tr.rec{background:#e6f5ec;font-weight:bold}
#answer{border:2px solid #2a7;border-radius:6px;padding:.2em 1.2em .8em;margin:1em 0}
#answer.none{border-color:#c33} .warn{color:#a40} #answer h2{margin-top:.5em}
pre{background:#f6f6f6;padding:.6em;overflow-x:auto;font-size:13px}
dt{font-weight:bold;float:left;width:12em} dd{margin-left:13em}"""


def _answer_html(study: optuna.Study, run_dir: Path, a: Answer) -> str:
    """The first section: the recommended model against the baseline (and peers), where its artifact is
    and how to load it; or, when no model is within the budgets, that, first."""
    from html import escape

    if a.chosen is None:
        missed = "".join(f"<li>{escape(m)}</li>" for m in a.missed)
        return (
            f'<section id="answer" class="none"><h2>No model within the budgets</h2>'
            f"<p>{a.completed} completed trial(s); none is on the feasible front within the study's budgets "
            f"({escape(budgets_line(a.budgets))}).</p>{f'<ul>{missed}</ul>' if missed else ''}"
            "<p>Loosen a budget (<code>budgets:</code> in the study file) or run more trials "
            "(<code>trials.n</code>); the trials are listed under Diagnostics.</p></section>"
        )
    path = artifact_path(study, run_dir, a.chosen)
    href = escape(str(path.relative_to(run_dir)) if path.is_relative_to(run_dir) else str(path))
    note, slower = peers_note(a), slower_note(a, run_dir)
    missing = "" if path.exists() else " (not there: <code>autocompress report RUN</code> exports the front)"
    return (
        f'<section id="answer"><h2>Recommended model: trial {a.chosen["trial"]}</h2>'
        f"<p>{escape(a.rule[0].upper() + a.rule[1:])}; budgets: {escape(budgets_line(a.budgets))}.</p>"
        + comparison(a).to_html(border=0, classes="t")
        + (f'<p class="warn">{escape(slower)}</p>' if slower else "")
        + (f"<p><small>{escape(note)}</small></p>" if note else "")
        + f'<p>Artifact: <a href="{href}"><code>{escape(str(path))}</code></a>{missing}. Load and run it:</p>'
        + f'<pre><code class="language-python">{escape(load_snippet(path))}</code></pre></section>'
    )


def _summary(study: optuna.Study, df: pd.DataFrame) -> dict[str, str]:
    """The run's facts for the diagnostics: study, task, backend, trials, baseline, budgets, hypervolume."""
    states = df.state.value_counts().to_dict() if len(df) else {}
    base = study.user_attrs.get("baseline") or {}
    env = study.user_attrs.get("environment") or {}
    cfg = study.user_attrs.get("config") or {}
    hv = study_hypervolume(study)
    name = base.get("metric_name")
    return {
        "study": study.study_name,
        "task": (cfg.get("task") or {}).get("name", "") or "",
        "backend / device": f"{env.get('backend', '')} / {env.get('device', '')} ({env.get('device_name', '')})",
        "trials": ", ".join(f"{v} {k.lower()}" for k, v in states.items()) or "none",
        "baseline": (
            f"{name or 'metric'} {fmt_metric(base['metric'], name)}, {fmt_ms(base['latency_ms'])}, "
            f"{fmt_bytes(base['size_bytes'])}"
            if base
            else "not measured"
        ),
        "budgets": budgets_line(study_budgets(study)),
        "hypervolume (last)": f"{hv[-1][1]:.4f}" if hv else "n/a",
        "kept model": _kept_summary(df),
    }


def _context_line(study: optuna.Study, a: Answer) -> str:
    """Under the title: where it was measured and how many trials."""
    env = study.user_attrs.get("environment") or {}
    backend = (study.user_attrs.get("config") or {}).get("backend") or {}
    where = f"{env.get('backend', '?')} on {env.get('device', '?')}"
    if env.get("device_name"):
        where += f" ({env['device_name']})"
    if backend:
        where += f", batch {backend.get('batch_size', 1)}, {backend.get('threads', 1)} thread(s)"
    return f"{where}; {a.completed} completed trial(s), {len(a.records)} on the feasible front"


def _front_table(a: Answer) -> str:
    """The front with units, the recommended model's row highlighted."""
    html = _table(front_display(a), "no feasible completed trial yet")
    if a.chosen is None:
        return html
    cell = f"<td>{a.chosen['trial']} (recommended)</td>"
    return html.replace(f"<tr>\n      {cell}", f'<tr class="rec">\n      {cell}')


def write_html(study: optuna.Study, run_dir: Path, first_line: str = "") -> Path:
    """``report.html``: the answer first (recommended model, its artifact, how to load it), then the front
    with units, its projections and per-layer choices, then the diagnostics (summary, applicability,
    coverage, profiles, failures, hypervolume, every trial). The PNGs are written beside it."""
    from html import escape

    run_dir = Path(run_dir)
    pngs = {
        "projections": plot_projections(study, run_dir),
        "layers": plot_layers(study, run_dir),
        "hypervolume": plot_hypervolume(study, run_dir),
    }
    a = answer_for(study, run_dir)
    df = trials_frame(study)
    per_layer = "".join(
        f"<h3>trial {trial}</h3>" + _table(group.drop(columns="trial"), "")
        for trial, group in layer_table(study).groupby("trial", sort=False)
    )
    cols = [c for c in df.columns if not c.startswith("param.")] if len(df) else []
    summary = "".join(
        f"<dt>{escape(k)}</dt><dd>{escape(str(v))}</dd>" for k, v in _summary(study, df).items()
    )
    title = escape(study.study_name)
    body = f"""<!doctype html><html><head><meta charset="utf-8"><title>autocompress: {title}</title>
<style>{CSS}</style></head><body>
<h1>autocompress report: {title}</h1><p class="ctx">{escape(_context_line(study, a))}</p>
{_answer_html(study, run_dir, a)}
<section id="front"><h2>Pareto front (within the budgets)</h2>
<p>Latency: median per call, timed side by side with the baseline; speedup and size against the baseline
artifact; metric of the artifact.</p>{_front_table(a)}
<h3>Projections</h3><p>Blue: feasible; grey x: over a budget; red rings: Pareto (3 objectives); black star: baseline.</p>
{_img(pngs["projections"])}
<h3>Per-layer choices of the Pareto models</h3>{_img(pngs["layers"])}{per_layer or "<p><em>no Pareto model yet</em></p>"}
</section>
<section id="diagnostics"><h2>Diagnostics</h2>
<h3>Summary</h3><dl>{summary}</dl>
<h3>Failures by reason</h3>{_table(failures_table(study), "no failed trial")}
<h3>Applicability (checked before the first trial)</h3>{_applicability_html(study)}
<h3>Profiles: measured latency and accuracy per layer x setting</h3>{profiles_html(study, run_dir)}
<h3>Hypervolume history</h3>{_img(pngs["hypervolume"])}
<h3>All trials</h3>{_table(df[cols] if len(df) else df, "no trial yet")}
</section></body></html>"""
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
    here = Path(__file__).parent  # a changed report module draws again
    code = [(here / f"{m}.py").stat().st_mtime_ns for m in ("report_html", "report_answer", "report_plots")]
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
