"""Shared helpers of the reliability tests: tiny study files, the CLI in a subprocess, and the check
that a run folder is consistent with its storage."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import yaml
from conftest import ROOT, cli_env
from optuna.trial import TrialState

from autocompress.search.repeats import REPEAT_OF

TRIAL_FILES = {"model.onnx", "plan.json", "metrics.json", "weights.safetensors"}
# latency measurement cut short: what these tests check (trials recorded once, folders whole, resumes) does
# not depend on how tight a latency's confidence interval is, and a machine-wide device lock serializes
# every timing on the host (the default rounds run 0.5-3 s per trial and baseline)
QUICK_TIMING = {"warmup_s": 0.05, "min_s": 0.1, "max_s": 0.5}
# backend options timing in the search process instead of a timing worker (``isolate: false``): for the
# tests that check no latency and nothing of the worker, it spares every run the worker's start (a second
# interpreter importing torch and the package: seconds of CPU beside the run's own on a 2-core runner)
NO_TIMING_WORKER = {"isolate": False}


def study_file(tmp_path: Path, name: str = "rel", **changes) -> tuple[Path, Path]:
    """A tiny study (digits width 8, 2 teacher epochs, 1 fine-tune epoch, random sampler, short timing)."""
    data = {
        "name": name,
        "task": {"name": "digits", "options": {"width": 8, "teacher_epochs": 2}},
        "space": {
            "file": str(ROOT / "autocompress/search_spaces/default.yaml"),
            "overrides": {"sparsity": {"low": 0.0, "high": 0.5, "step": 0.1}},
        },
        "finetune": {"epochs": 1, "threads": 1},
        "backend": {"options": {"timing": dict(QUICK_TIMING)}},
        "sampler": {"name": "random"},
        "trials": {"n": 4, "warm_start": [{"bits": 8}]},  # explicit: no planned starts (profile)
        "output": str(tmp_path / "run"),
    }
    for dotted, value in changes.items():
        node = data
        *parents, last = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    if "planned_starts" not in data["trials"]:  # a test's own trials={...} keeps the fixed warm start:
        data["trials"].setdefault("warm_start", [{"bits": 8}])  # planned starts depend on timings
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path, Path(data["output"])


def cli(*args, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    full_env = cli_env()
    for key in ("AUTOCOMPRESS_CRASH_AT", "AUTOCOMPRESS_FAULT"):
        full_env.pop(key, None)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "autocompress.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
    )


def cli_here(*args) -> subprocess.CompletedProcess:
    """A read-only command (``report``, ``pick``) run in this process: what it prints and returns, without
    the 3 s a new process takes to start (the commands that run trials go through :func:`cli`)."""
    import contextlib
    import io

    from autocompress.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    return subprocess.CompletedProcess(args, rc, out.getvalue(), err.getvalue())


def popen(*args, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "autocompress.cli", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**cli_env(), **(env or {})},
    )


def load(run: Path) -> optuna.Study:
    url = f"sqlite:///{run}/study.db"
    return optuna.load_study(study_name=optuna.get_all_study_names(url)[0], storage=url)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_referenced_folders(run: Path, study: optuna.Study, *, keep: str = "all") -> None:
    """Every completed trial points to a whole folder (or, with keep=pareto and off the front, none)."""
    front = {t.number for t in study.best_trials}
    for t in study.get_trials(states=(TrialState.COMPLETE,)):
        if REPEAT_OF in t.user_attrs:  # a repeat of an earlier plan: its results, no folder of its own
            continue
        folder = (run / t.user_attrs["artifact"]).parent
        assert not folder.name.startswith("."), f"trial {t.number} references temp folder {folder}"
        if keep == "pareto" and t.number not in front:
            assert not folder.exists(), f"dominated trial {t.number} still has {folder}"
            continue
        assert {p.name for p in folder.iterdir()} == TRIAL_FILES, (t.number, sorted(os.listdir(folder)))
        m = json.loads((folder / "metrics.json").read_text())
        assert m["metric"] == t.values[0] and m["latency_ms"] == t.values[1]
        assert m["size_bytes"] == t.values[2] == (folder / "model.onnx").stat().st_size
        assert json.loads((folder / "plan.json").read_text()) == t.user_attrs["plan"]


def check_consistent(run: Path, n: int, *, keep: str = "all") -> optuna.Study:
    """The final state after a completed run: the storage, the folders and the front all agree."""
    study = load(run)
    trials = study.get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE and REPEAT_OF not in t.user_attrs]
    assert len(complete) == n, [(t.number, t.state.name) for t in trials]
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    for t in trials:
        if t.state == TrialState.FAIL:
            assert t.user_attrs["fail_reason"] and "\n" not in t.user_attrs["fail_reason"]
            assert t.user_attrs["fail_category"]
    # every interrupted trial was queued again with the same parameters
    retries = {t.user_attrs["retry_of"]: t for t in trials if "retry_of" in t.user_attrs}
    for t in trials:
        if t.user_attrs.get("fail_category") == "interrupted" and (t.params or "fixed_plan" in t.user_attrs):
            assert t.number in retries, f"interrupted trial {t.number} was not retried"
            assert retries[t.number].params == t.params
            assert retries[t.number].user_attrs.get("fixed_plan") == t.user_attrs.get("fixed_plan")
    # nothing half written left, no folder without a completed trial
    debris = [p.name for p in [*run.iterdir(), *(run / "trials").iterdir()] if p.name.startswith(".")]
    assert not debris, debris
    on_disk = {int(p.name) for p in (run / "trials").iterdir()}
    front = {t.number for t in study.best_trials}
    expected = {t.number for t in complete} if keep == "all" else front
    assert on_disk == expected, (on_disk, expected)
    check_referenced_folders(run, study, keep=keep)
    # the exported front is the storage's front, each folder whole and equal to the trial's
    exported = json.loads((run / "pareto" / "front.json").read_text())["front"]
    assert {r["trial"] for r in exported} == front and front
    for r in exported:
        folder = run / r["folder"]
        assert {p.name for p in folder.iterdir()} == TRIAL_FILES
        assert sha(folder / "model.onnx") == sha(run / r["source"] / "model.onnx")
    assert {p.name for p in (run / "pareto").iterdir()} == {"front.json"} | {f"trial-{k:05d}" for k in front}
    return study
