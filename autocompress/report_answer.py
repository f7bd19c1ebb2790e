"""The answer a report opens with: the recommended model within the study's budgets, against the
baseline (and the peer answers where ``benchmarks/peers.py`` measured them), where its artifact is and
how to load it; then the front with units and sensible digits. Shared by ``report.html`` and the text
report of ``autocompress report``."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import pandas as pd
from optuna.trial import TrialState

from .export import front_records
from .pareto import recommend as pareto_recommend
from .pareto import within_budgets
from .units import (  # noqa: F401 - re-exported: the report's number formats
    fmt_bytes,
    fmt_drop,
    fmt_metric,
    fmt_ms,
    fmt_size_ratio,
    fmt_speedup,
    is_fraction_metric,
    significant,
)

BUDGET_KEYS = ("max_metric_drop", "max_metric_drop_rel", "max_latency_ms", "max_size_bytes")
PEERS_JSON = Path("peers") / "peers.json"  # written by benchmarks/peers.py into the run folder


# -- the recommendation ---------------------------------------------------------------------------
@dataclass
class Answer:
    """What the report opens with.

    Attributes:
        chosen: the recommended front record (see :func:`autocompress.export.front_records`), or None.
        rule: how it was chosen, one sentence.
        budgets: the study's budgets that are set.
        records: the feasible front.
        completed: completed trials.
        missed: when nothing is within the budgets: per budget, the best value any completed trial reached.
        baseline: the study's baseline (metric, latency_ms, size_bytes, metric_name).
        peers: the peers' rows of ``peers/peers.json`` (measured side by side), if the run has one.
    """

    chosen: dict | None
    rule: str
    budgets: dict
    records: list[dict]
    completed: int
    missed: list[str] = field(default_factory=list)
    baseline: dict = field(default_factory=dict)
    peers: list[dict] = field(default_factory=list)


def recommend(records: list[dict], budgets: dict) -> tuple[dict | None, str]:
    """The model to deploy among ``records`` within ``budgets``, and the rule that chose it.

    With a metric budget, the fastest model within every budget (then the smallest): the budget bounds
    what accuracy may be given up. Without one, the most accurate model within the budgets (then the
    fastest), as ``autocompress pick`` chooses."""
    best = pareto_recommend(records, **{k: budgets.get(k) for k in BUDGET_KEYS})
    if best is None:
        return None, "no Pareto model is within the budgets"
    n = sum(within_budgets(r, **{k: budgets.get(k) for k in BUDGET_KEYS}) for r in records)
    if budgets.get("max_metric_drop") is not None or budgets.get("max_metric_drop_rel") is not None:
        if n == 1:
            return best, "the only Pareto model within the budgets"
        return best, f"the fastest of the {n} Pareto models within the budgets (then the smallest)"
    if n == 1:
        return best, "the only Pareto model within the budgets (no metric budget is set)"
    return best, (
        f"the most accurate of the {n} Pareto models within the budgets (no metric budget is set: "
        "budgets.max_metric_drop trades accuracy for speed)"
    )


def _missed(study: optuna.Study, budgets: dict) -> list[str]:
    """Per budget, the best value any completed trial reached (why nothing is within the budgets)."""
    done = [t.user_attrs for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    name = (study.user_attrs.get("baseline") or {}).get("metric_name")
    pts = is_fraction_metric(name)

    def drop(v: float) -> str:
        return f"{v:.4g}" + (f" ({v * 100:.2f} pts)" if pts else "")

    shown = {
        "max_metric_drop": ("metric_drop", drop),
        "max_metric_drop_rel": ("metric_drop_rel", lambda v: f"{v * 100:.2f}%"),
        "max_latency_ms": ("latency_ms", fmt_ms),
        "max_size_bytes": ("size_bytes", fmt_bytes),
    }
    out = []
    for key, (attr, fmt) in shown.items():
        limit = budgets.get(key)
        values = [ua[attr] for ua in done if ua.get(attr) is not None]
        if limit is None or not values:
            continue
        best = min(values)
        shown_limit = f"{limit * 100:.2f}%" if key == "max_metric_drop_rel" else fmt(limit)
        status = "met by some trials" if best <= limit else "missed by every trial"
        out.append(f"{key} {shown_limit}: {status} (best {attr} {fmt(best)})")
    return out


def read_peers(run_dir: Path) -> list[dict]:
    """The rows of ``peers/peers.json`` that ran (written by ``benchmarks/peers.py``), else []."""
    path = Path(run_dir) / PEERS_JSON
    try:
        rows = json.loads(path.read_text()).get("rows", [])
    except (OSError, ValueError):
        return []
    return [r for r in rows if r.get("status") == "ok" and r.get("metric") is not None]


def study_budgets(study: optuna.Study) -> dict:
    """The budgets of the study's file that are set."""
    cfg = study.user_attrs.get("config") or {}
    return {k: v for k, v in (cfg.get("budgets") or {}).items() if v is not None}


def answer_for(study: optuna.Study, run_dir: Path) -> Answer:
    """The recommendation of a run (see :class:`Answer`)."""
    budgets = study_budgets(study)
    records = front_records(study)
    chosen, rule = recommend(records, budgets)
    completed = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    return Answer(
        chosen=chosen,
        rule=rule,
        budgets=budgets,
        records=records,
        completed=completed,
        missed=[] if chosen else _missed(study, budgets),
        baseline=study.user_attrs.get("baseline") or {},
        peers=read_peers(run_dir),
    )


def artifact_path(study: optuna.Study, run_dir: Path, record: dict) -> Path:
    """Where the exported artifact of a front record is (``<run>/pareto/trial-NNNNN/<file>``)."""
    trial = next(t for t in study.get_trials(deepcopy=False) if t.number == record["trial"])
    return Path(run_dir) / record["folder"] / Path(trial.user_attrs.get("artifact", "model.onnx")).name


def onnx_feeds(path: Path) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, numpy dtype) of an ONNX graph's fed inputs; symbolic dimensions taken as 1."""
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    graph = onnx.load(str(path), load_external_data=False).graph
    inits = {i.name for i in graph.initializer}
    feeds = []
    for i in graph.input:
        if i.name in inits:
            continue
        t = i.type.tensor_type
        shape = tuple(d.dim_value if d.HasField("dim_value") else 1 for d in t.shape.dim)
        feeds.append((i.name, shape, tensor_dtype_to_np_dtype(t.elem_type).name))
    return feeds


def load_snippet(path: Path) -> str:
    """Three lines of Python that load the artifact with ONNX Runtime and run it on zeros of the deployed
    shape (a non-ONNX artifact: how to load it with its backend)."""
    if path.suffix == ".pt2":  # the torch backend: a torch.export program
        return (
            "import torch\n"
            f"model = torch.export.load({str(path)!r}).module()\n"
            "outputs = model(*inputs)  # inputs: tensors of the deployed shape"
        )
    if path.suffix != ".onnx":
        return f"# a {path.suffix} artifact: time it with autocompress measure {path}"
    try:
        feeds = onnx_feeds(path)
    except (OSError, ValueError, ImportError):
        feeds = []
    args = ", ".join(f"{name!r}: np.zeros({shape!r}, np.{dtype})" for name, shape, dtype in feeds)
    return (
        "import numpy as np, onnxruntime as ort\n"
        f"session = ort.InferenceSession({str(path)!r})\n"
        f"outputs = session.run(None, {{{args}}})"
    )


# -- the front, formatted ------------------------------------------------------------------------
def front_display(answer: Answer) -> pd.DataFrame:
    """The front as a table of strings with units (the recommended model marked), best metric first."""
    name = answer.baseline.get("metric_name")
    rows = []
    for r in answer.records:
        full = r.get("metric_full")
        rows.append(
            {
                "trial": f"{r['trial']}{' (recommended)' if r is answer.chosen else ''}",
                name or "metric": fmt_metric(r["metric"], name),
                "vs baseline": fmt_drop(r.get("metric_drop"), r.get("metric_drop_rel"), name),
                "whole eval set": fmt_metric(full, name) if full is not None else "",
                "latency (median)": fmt_ms(r["latency_ms"]),
                "p90": fmt_ms(r.get("latency_p90_ms")),
                "speedup": fmt_speedup(r.get("speedup")),
                "size": fmt_bytes(r["size_bytes"]),
                "smaller by": fmt_size_ratio(r.get("size_ratio")),
                "folder": r["folder"],
            }
        )
    df = pd.DataFrame(rows)
    if len(df) and not (df["whole eval set"] != "").any():
        df = df.drop(columns="whole eval set")
    return df


def comparison(answer: Answer) -> pd.DataFrame:
    """The recommended model beside the baseline and the peers' answers: metric, latency, speedup, size."""
    name, base, rec = answer.baseline.get("metric_name"), answer.baseline, answer.chosen
    cols = {}
    if rec is not None:
        cols[f"recommended (trial {rec['trial']})"] = [
            fmt_metric(rec["metric"], name),
            fmt_drop(rec.get("metric_drop"), rec.get("metric_drop_rel"), name),
            fmt_ms(rec["latency_ms"]),
            fmt_speedup(rec.get("speedup")),
            f"{fmt_bytes(rec['size_bytes'])} ({fmt_size_ratio(rec.get('size_ratio'))})",
        ]
    if base:
        cols["baseline (float)"] = [
            fmt_metric(base.get("metric"), name),
            "",
            fmt_ms(base.get("latency_ms")),
            "1.00x",
            fmt_bytes(base.get("size_bytes")),
        ]
    for p in answer.peers:
        if p.get("kind") != "peer":
            continue
        cols[p.get("label") or p["name"]] = [
            fmt_metric(p["metric"], name),
            fmt_drop(p.get("drop"), p.get("drop_rel"), name),
            fmt_ms(p.get("latency_ms")),
            fmt_speedup(p.get("speedup")),
            f"{fmt_bytes(p.get('size_bytes'))} ({fmt_size_ratio(p.get('size_ratio'))})",
        ]
    index = [name or "metric", "vs baseline", "latency (median)", "speedup", "size"]
    df = pd.DataFrame(cols, index=index)
    if rec is not None and rec.get("metric_full") is not None:  # trials.eval_samples: a subset in the search
        full = {c: "" for c in df.columns}
        full[df.columns[0]] = fmt_metric(rec["metric_full"], name)
        df.loc[f"{name or 'metric'} (whole eval set)"] = full
    return df


def budgets_line(budgets: dict) -> str:
    """``max_metric_drop 0.03, max_latency_ms 0.5`` or ``none``."""
    return ", ".join(f"{k} {v:g}" for k, v in budgets.items()) or "none"


def answer_lines(study: optuna.Study, run_dir: Path, answer: Answer | None = None) -> list[str]:
    """The text report's opening: the recommendation (or why there is none) and how to load it."""
    a = answer or answer_for(study, run_dir)
    if a.chosen is None:
        head = (
            f"NO MODEL WITHIN THE BUDGETS ({budgets_line(a.budgets)}): {a.completed} completed trial(s), "
            f"{len(a.records)} on the feasible front."
        )
        return [head, *(f"  {m}" for m in a.missed), "  loosen a budget or run more trials (trials.n)."]
    lines = [f"RECOMMENDED: trial {a.chosen['trial']}, {a.rule}; budgets: {budgets_line(a.budgets)}"]
    table = comparison(a)
    lines += ["  " + s for s in table.to_string().splitlines()]
    slower = slower_note(a, run_dir)
    lines += [f"  {slower}"] if slower else []
    path = artifact_path(study, run_dir, a.chosen)
    lines += [f"artifact: {path}", "load it:", *("  " + s for s in load_snippet(path).splitlines())]
    return lines


def slower_note(answer: Answer, run_dir: Path) -> str:
    """A warning when the recommended model is not faster than the baseline artifact."""
    speedup = (answer.chosen or {}).get("speedup")
    if speedup is None or speedup >= 1.0:
        return ""
    return (
        f"It runs at {fmt_speedup(speedup)} the baseline's speed: within these budgets no model got faster; "
        f"the baseline artifact ({Path(run_dir) / 'baseline' / 'model.onnx'}) may be the better deployment."
    )


def peers_note(answer: Answer) -> str:
    """Where the peers' figures come from, and the recommended model's speedup in their session."""
    if not any(p.get("kind") == "peer" for p in answer.peers):
        return ""
    again = [
        p
        for p in answer.peers
        if p.get("kind") == "autocompress" and answer.chosen and p.get("trial") == answer.chosen["trial"]
    ]
    also = (
        f"; the recommended model timed in that session: {fmt_speedup(again[0].get('speedup'))}"
        if again
        else ""
    )
    return (
        "Peers: other tools' answers on the same float model, scored on the whole eval split and timed side "
        f"by side with the baseline in one session by benchmarks/peers.py (peers/peers.json){also}."
    )


def text_report(study: optuna.Study, run_dir: Path) -> list[str]:
    """``autocompress report``'s text: the answer, the front (units, sensible digits), the diagnostics."""
    from .report import applicability_table, failures_table

    a = answer_for(study, run_dir)
    lines = [*answer_lines(study, run_dir, a), "", "Pareto front (within the budgets):"]
    front = front_display(a)
    lines += ["  " + s for s in front.to_string(index=False).splitlines()] if len(front) else ["  none yet"]
    note = peers_note(a)
    lines += [note] if note else []
    lines += ["", "diagnostics:"]
    base, name = a.baseline, a.baseline.get("metric_name")
    if base:
        lines.append(
            f"  baseline: {name or 'metric'} {fmt_metric(base.get('metric'), name)} | "
            f"{fmt_ms(base.get('latency_ms'))} | {fmt_bytes(base.get('size_bytes'))}"
        )
    states = pd.Series([t.state.name for t in study.get_trials(deepcopy=False)]).value_counts()
    lines.append("  trials: " + (", ".join(f"{v} {k.lower()}" for k, v in states.items()) or "none"))
    checks = (study.user_attrs.get("applicability") or {}).get("checks")
    if checks is not None:
        lines.append(
            f"  applicability: {len(checks)} (technique, layer) pairs checked, "
            f"{len(applicability_table(study))} removed from the search space"
        )
    cov = study.user_attrs.get("coverage")
    if cov and cov.get("params_share") is not None:
        lines.append(f"  coverage: the search can change {cov['params_share']:.1%} of the model's parameters")
    fails = failures_table(study)
    if len(fails):
        lines.append("failed trials by reason:")
        lines += ["  " + s for s in fails.to_string(index=False, max_colwidth=90).splitlines()]
    return lines
