"""End to end: real studies through the CLI (Optuna + SQLite + ONNX Runtime, no mocks)."""

from __future__ import annotations

import json
import subprocess
import sys

import optuna
import pandas as pd
import pytest
import yaml
from conftest import ROOT, cli_env
from reliability_helpers import NO_TIMING_WORKER, QUICK_TIMING, cli_here

pytestmark = pytest.mark.slow


def _study(tmp_path, name="tiny", **changes) -> tuple:
    data = {
        "name": name,
        "task": {"name": "digits", "options": {"width": 8, "teacher_epochs": 3}},
        "space": {
            "file": str(ROOT / "autocompress/search_spaces/default.yaml"),
            "overrides": {"sparsity": {"low": 0.0, "high": 0.5, "step": 0.1}},
        },
        "finetune": {"epochs": 1},
        # short timing rounds, no timing worker: these tests check the run folder, resumes and budgets,
        # not latencies
        "backend": {"options": {"timing": dict(QUICK_TIMING), **NO_TIMING_WORKER}},
        "sampler": {"name": "random"},
        "trials": {"n": 4, "warm_start": [{"bits": 8}]},  # explicit: no planned starts (profile)
        "output": str(tmp_path / "run"),
    }
    for key, value in changes.items():
        data[key] = value
    if "planned_starts" not in data["trials"]:  # a test's own trials={...} keeps the fixed warm start:
        data["trials"].setdefault("warm_start", [{"bits": 8}])  # planned starts depend on timings
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path, tmp_path / "run"


def _cli(*args, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "autocompress.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=timeout,
    )


def _load(run):
    return optuna.load_study(
        study_name=optuna.get_all_study_names(f"sqlite:///{run}/study.db")[0],
        storage=f"sqlite:///{run}/study.db",
    )


def test_run_writes_the_run_folder_and_resumes(tmp_path):
    study_file, run = _study(tmp_path)
    first = _cli("run", study_file, "--stop-after", 2)
    assert first.returncode == 0, first.stderr
    assert "[1/4] trial 0" in first.stdout and "ETA" in first.stdout
    assert len(_load(run).get_trials(states=(optuna.trial.TrialState.COMPLETE,))) == 2
    second = _cli("run", study_file)
    assert second.returncode == 0, second.stderr
    assert "training the teacher" not in second.stdout  # cached in the run folder
    assert "[3/4] trial 2" in second.stdout and "trial 0:" not in second.stdout

    study = _load(run)
    trials = study.get_trials()
    assert len(trials) == 4 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    plans = [json.dumps(t.user_attrs["plan"], sort_keys=True) for t in trials]
    assert len(set(plans)) == 4  # the resumed sampler is reseeded: it does not propose trial 1's plan again
    assert sorted(p.name for p in (run / "trials").iterdir()) == ["00000", "00001", "00002", "00003"]
    for name in ("study.db", "trials.csv", "pareto.png", "teacher.safetensors", "baseline/model.onnx"):
        assert (run / name).exists(), name
    table = pd.read_csv(run / "trials.csv")
    assert len(table) == 4 and {
        "metric",
        "latency_ms",
        "size_bytes",
        "speedup",
        "param.bits.classifier",
        "kept",
        "holdout_post_training",
        "holdout_finetuned",
    } <= set(table)
    assert set(table.kept) <= {"finetuned", "post_training"}  # finetune.keep_better (on by default)

    front = json.loads((run / "pareto" / "front.json").read_text())["front"]
    assert len(front) >= 1
    for rec in front:
        folder = run / rec["folder"]
        assert {p.name for p in folder.iterdir()} == {
            "model.onnx",
            "plan.json",
            "metrics.json",
            "weights.safetensors",
        }
        m = json.loads((folder / "metrics.json").read_text())
        for key in (
            "metric",
            "latency_ms",
            "latency_p90_ms",
            "size_bytes",
            "baseline_metric",
            "baseline_latency_ms",
            "baseline_size_bytes",
            "speedup",
            "size_ratio",
            "metric_drop",
        ):
            assert key in m, key
        assert m["kept"] in ("finetuned", "post_training") and 0 <= m["holdout_finetuned"] <= 1
        assert m["size_bytes"] == (folder / "model.onnx").stat().st_size
        assert m["speedup"] == pytest.approx(m["baseline_latency_ms"] / m["latency_measured_ms"])
        # the objective: the side-by-side ratio in milliseconds of the run's reference baseline
        assert m["latency_ms"] == pytest.approx(study.user_attrs["baseline"]["latency_ms"] / m["speedup"])
        assert m["metric_drop"] == pytest.approx(m["baseline_metric"] - m["metric"])
        plan = json.loads((folder / "plan.json").read_text())
        assert plan == study.trials[rec["trial"]].user_attrs["plan"]

    again = cli_here("run", study_file)  # a complete study runs nothing more (here: no new process)
    assert "nothing to run" in again.stdout and len(_load(run).trials) == 4

    report = cli_here("report", run)
    assert report.returncode == 0 and "Pareto front" in report.stdout
    best = cli_here("pick", run, "--max-metric-drop", 1.0)
    assert best.returncode == 0 and str(run / "pareto" / "trial-") in best.stdout
    none = cli_here("pick", run, "--max-latency-ms", 1e-6)
    assert none.returncode == 1 and "no Pareto model" in none.stderr


def test_infeasible_trials_never_enter_the_front(tmp_path):
    # the float warm start is too big for a size budget of 0.9x the baseline; int8 fits
    study_file, run = _study(
        tmp_path,
        trials={"n": 4, "warm_start": [{"bits": 32}, {"bits": 8}]},
        task={"name": "digits", "options": {"width": 16, "teacher_epochs": 4}},
    )
    cfg = yaml.safe_load(study_file.read_text())
    first = _cli("run", study_file, "--stop-after", 0)  # teacher + baseline only
    assert first.returncode == 0, first.stderr
    base = json.loads((run / "baseline" / "metrics.json").read_text())
    budget = int(base["size_bytes"] * 0.9)
    cfg["budgets"] = {"max_size_bytes": budget}
    study_file.write_text(yaml.safe_dump(cfg))
    proc = _cli("run", study_file)
    assert proc.returncode == 0, proc.stderr
    study = _load(run)
    infeasible = [t for t in study.trials if any(v > 0 for v in t.constraints.values())]
    assert infeasible, "the float warm start should be over the size budget"
    front = {t.number for t in study.best_trials}
    assert front and not front & {t.number for t in infeasible}
    exported = json.loads((run / "pareto" / "front.json").read_text())["front"]
    assert {r["trial"] for r in exported} == front
    assert all(r["size_bytes"] <= budget for r in exported)


def test_user_task_and_failed_trials(tmp_path):
    ok_file, run = _study(
        tmp_path,
        name="user",
        task={"name": "tiny_tasks:mlp", "options": {"hidden": 16}},
        trials={"n": 2, "warm_start": [{"bits": 8, "rank_ratio": 0.5}]},
    )
    proc = _cli("run", ok_file)
    assert proc.returncode == 0, proc.stderr
    assert len(_load(run).get_trials(states=(optuna.trial.TrialState.COMPLETE,))) == 2

    bad_file, bad_run = _study(
        tmp_path / "b", name="nan", task={"name": "tiny_tasks:nan_data"}, trials={"n": 2, "max_failures": 1}
    )
    proc = _cli("run", bad_file)
    assert proc.returncode == 1 and "too many failed trials" in proc.stderr
    study = _load(tmp_path / "b" / "run")
    assert [t.state.name for t in study.trials] == ["FAIL", "FAIL"]
    assert all(
        "NonFiniteLoss: non-finite fine-tuning loss" in t.user_attrs["fail_reason"] for t in study.trials
    )
    assert [t.user_attrs["fail_category"] for t in study.trials] == ["non-finite loss"] * 2
    assert not (tmp_path / "b" / "run" / "trials").exists() or not any(
        (tmp_path / "b" / "run" / "trials").iterdir()
    )
