"""Pareto models -> a deployable folder per model, with a manifest."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import optuna

from .faults import crash_point
from .rundir import FRONT, PARETO, pareto_folder_name, write_json


def front_records(study: optuna.Study) -> list[dict]:
    """The feasible Pareto front as plain records (trial number, folder, metrics)."""
    records = []
    full = study.user_attrs.get("metric_full", {})
    for t in sorted(study.best_trials, key=lambda t: t.user_attrs.get("metric_drop", 0.0)):
        ua = t.user_attrs
        if ua.get("repeat_of") is not None:  # the same model as an earlier trial (search/repeats.py)
            continue
        records.append(
            {
                "trial": t.number,
                "folder": pareto_folder_name(t.number),
                "metric": t.values[0],
                "latency_ms": t.values[1],
                "size_bytes": int(t.values[2]),
                "speedup": ua.get("speedup"),
                "size_ratio": ua.get("size_ratio"),
                "metric_drop": ua.get("metric_drop"),
                "metric_drop_rel": ua.get("metric_drop_rel"),
                "metric_name": ua.get("metric_name"),
                "metric_full": full.get(str(t.number), {}).get("metric"),
                "metric_drop_full": full.get(str(t.number), {}).get("metric_drop"),
                "latency_p90_ms": ua.get("latency_p90_ms"),
                "source": str(Path(ua["artifact"]).parent),
            }
        )
    return records


def export_front(study: optuna.Study, run_dir: Path) -> list[dict]:
    """(Re)build ``run_dir/pareto/``: one folder per Pareto model + ``front.json``, swapped in whole."""
    run_dir = Path(run_dir)
    records = front_records(study)
    tmp, final, old = run_dir / f".{PARETO}.tmp", run_dir / PARETO, run_dir / f".{PARETO}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for r in records:
        shutil.copytree(run_dir / r["source"], tmp / Path(r["folder"]).name)
    write_json(tmp / FRONT, {"front": records, "baseline": study.user_attrs.get("baseline")})
    crash_point("pareto_export")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return records


def load_front(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / PARETO / FRONT
    return json.loads(path.read_text())["front"]
