"""Cluster-scale search, for real: a local two-node Ray cluster, and workers sharing a journal storage.

Each test kills a worker in the middle of a trial and checks that the study still reaches exactly the
requested number of completed trials (no trial counted twice) in a run folder of the same shape as a
local run.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import ROOT, cli_env
from optuna.trial import TrialState
from reliability_helpers import NO_TIMING_WORKER, QUICK_TIMING, cli_here

from autocompress.search.repeats import REPEAT_OF

pytestmark = pytest.mark.slow

LOCAL_RUN_FILES = (
    "study.yaml",
    "trials.csv",
    "pareto.png",
    "pareto/front.json",
    "teacher.safetensors",
    "baseline/model.onnx",
)


def _study_file(tmp_path: Path, name: str, n: int, **changes) -> tuple[Path, Path]:
    data = {
        "name": name,
        "task": {"name": "digits", "options": {"width": 8, "teacher_epochs": 3}},
        "space": {
            "file": str(ROOT / "autocompress/search_spaces/default.yaml"),
            "overrides": {"sparsity": {"low": 0.0, "high": 0.5, "step": 0.1}},
        },
        "finetune": {"epochs": 2, "threads": 1},
        # each trial's timing worker also keeps its trial running for seconds after its folder appears:
        # the Ray tests kill the node once two trials have folders (without one, trials are gone first)
        "backend": {"options": {"timing": dict(QUICK_TIMING)}},
        "budgets": {"max_metric_drop": 0.2},
        "sampler": {"name": "random"},
        "trials": {"n": n, "warm_start": []},
        "output": str(tmp_path / "run"),
        **changes,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path, tmp_path / "run"


def _cmd(*args) -> list[str]:
    return [sys.executable, "-m", "autocompress.cli", *map(str, args)]


def _running_dirs(run: Path) -> list[Path]:
    trials = run / "trials"
    return [p for p in trials.iterdir() if p.name.endswith(".tmp")] if trials.is_dir() else []


def _wait_for(predicate, timeout_s: float, what: str, proc: subprocess.Popen | None = None) -> None:
    t0 = time.monotonic()
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{proc.args[:4]} exited ({proc.returncode}) before {what}")
        if time.monotonic() - t0 > timeout_s:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _check_run_folder(run: Path, study: optuna.Study, n: int, files=()) -> list[optuna.trial.FrozenTrial]:
    # a repeat of an earlier plan (autocompress/search/repeats.py) completes with its results, runs
    # nothing and is not counted
    complete = [t for t in study.get_trials(states=(TrialState.COMPLETE,)) if REPEAT_OF not in t.user_attrs]
    assert len(complete) == n
    assert sorted(p.name for p in (run / "trials").iterdir()) == sorted(f"{t.number:05d}" for t in complete)
    for name in (*LOCAL_RUN_FILES, *files):
        assert (run / name).exists(), name
    for t in complete:
        assert {"plan", "artifact", "metric", "latency_ms", "speedup"} <= set(t.user_attrs)
        assert (run / t.user_attrs["artifact"]).is_file()
        assert "metric_drop" in t.constraints  # the budget reached Optuna's samplers
    return complete


# ---------------------------------------------------------------- Ray


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_node(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    ports = []
    for flag in (
        "--node-manager-port",
        "--object-manager-port",
        "--dashboard-agent-listen-port",
        "--dashboard-agent-grpc-port",
        "--runtime-env-agent-port",
        "--metrics-export-port",
    ):
        ports += [flag, str(_free_port())]
    cmd = ["ray", "start", "--block", "--num-cpus", "1", "--node-ip-address", "127.0.0.1"]
    cmd += ["--disable-usage-stats", *ports, *args]
    # its own session: killing the process group kills exactly this node (raylet, its workers)
    return subprocess.Popen(
        cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True
    )


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _kill_node(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


@pytest.fixture
def ray_cluster(tmp_path):
    """A head and one worker node on 127.0.0.1, each its own ``ray start`` process (1 CPU each)."""
    pytest.importorskip("ray.tune")
    temp_dir = tempfile.mkdtemp(prefix="ac-ray-", dir="/tmp")  # short: ray's unix sockets live under it
    env = {**cli_env(), "RAY_AUTH_MODE": "disabled"}  # a throwaway cluster reachable only on this host
    port = _free_port()
    fast_health = {"health_check_period_ms": 500, "health_check_failure_threshold": 4}
    head = _ray_node(
        ["--head", "--port", str(port), "--temp-dir", temp_dir, "--include-dashboard", "false"]
        + ["--system-config", json.dumps(fast_health)],
        env,
        tmp_path / "head.log",
    )
    _wait_for(lambda: _listening(port), 60, "the head node's port", head)  # then the worker can join
    worker = _ray_node(["--address", f"127.0.0.1:{port}"], env, tmp_path / "worker.log")
    try:
        yield {"address": f"127.0.0.1:{port}", "env": env, "head": head, "worker": worker}
    finally:
        for node in (worker, head):
            _kill_node(node, signal.SIGTERM)
        deadline = time.monotonic() + 1  # a second to stop on their own, then killed
        for node in (worker, head):
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.wait(timeout=max(0.0, deadline - time.monotonic()))
        for node in (worker, head):
            _kill_node(node, signal.SIGKILL)
            node.wait(timeout=30)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_cluster_survives_a_lost_node(tmp_path, ray_cluster):
    n = 4  # the node goes once two trials run at once: the first two, or later ones
    study_file, run = _study_file(
        tmp_path, "raytiny", n, ray={"cpus_per_trial": 1, "max_concurrent": 2, "max_failures": 3}
    )
    driver_log = (tmp_path / "driver.log").open("w")
    driver = subprocess.Popen(
        _cmd("run", study_file, "--ray", ray_cluster["address"]),
        env=ray_cluster["env"],
        stdout=driver_log,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        # one CPU per node and one CPU per trial: two trials running at once means one is on the worker
        _wait_for(lambda: len(_running_dirs(run)) >= 2, 150, "two trials running at once", driver)
        _kill_node(ray_cluster["worker"])
        rc = driver.wait(timeout=200)
    finally:
        if driver.poll() is None:
            driver.kill()
        driver_log.close()
    out = (tmp_path / "driver.log").read_text()
    assert rc == 0, out[-3000:]
    assert f"{n}/{n} trials completed" in out
    study = optuna.load_study(study_name="raytiny", storage=f"sqlite:///{run}/study.db")
    _check_run_folder(run, study, n, files=["study.db"])
    assert not study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))
    # the trial that ran on the lost node was retried by Tune (its failure is in Tune's records)
    errors = [p for p in (run / "ray").rglob("error*.txt")]
    assert errors, "no trial was lost with the node"
    report = cli_here("report", run)
    assert report.returncode == 0, report.stderr

    # a driver that dies mid-trial: the same command again continues the same study
    driver = subprocess.Popen(
        _cmd("run", study_file, "--ray", ray_cluster["address"], "--n-trials", n + 1),
        env=ray_cluster["env"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for(lambda: len(_running_dirs(run)) >= 1, 150, "the last trial running", driver)
    finally:
        driver.kill()
        driver.wait()
    again = subprocess.run(
        _cmd("run", study_file, "--ray", ray_cluster["address"], "--n-trials", n + 1),
        env=ray_cluster["env"],
        capture_output=True,
        text=True,
        timeout=200,
    )
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "was interrupted; marked failed and queued again" in again.stdout
    study = optuna.load_study(study_name="raytiny", storage=f"sqlite:///{run}/study.db")
    complete = _check_run_folder(run, study, n + 1, files=["study.db"])
    (lost,) = study.get_trials(states=(TrialState.FAIL,))
    assert lost.user_attrs["fail_reason"].startswith("interrupted")
    (retry,) = [t for t in complete if t.user_attrs.get("retry_of") == lost.number]
    assert retry.params == lost.params


# ---------------------------------------------------------------- shared-storage workers


def test_two_workers_share_a_journal_and_survive_a_killed_worker(tmp_path):
    n = 6
    journal = tmp_path / "shared" / "journal.log"
    study_file, run = _study_file(
        tmp_path,
        "workers",
        n,
        storage=f"journal://{journal}",
        workers={"heartbeat_interval_s": 1, "grace_period_s": 3, "max_retry": 2},
        # no latency checked: no timing worker beside each worker (the kill waits on RUNNING trials)
        backend={"options": {"timing": dict(QUICK_TIMING), **NO_TIMING_WORKER}},
    )
    journal.parent.mkdir()
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    logs = [(tmp_path / f"worker{i}.log").open("w") for i in range(2)]
    workers = [
        subprocess.Popen(_cmd("worker", study_file), env=cli_env(), stdout=f, stderr=subprocess.STDOUT)
        for f in logs
    ]

    def running_of_victim() -> bool:
        if not journal.exists() or "workers" not in optuna.get_all_study_names(storage):
            return False
        study = optuna.load_study(study_name="workers", storage=storage)
        done = len(study.get_trials(states=(TrialState.COMPLETE,)))
        return done >= 1 and len(study.get_trials(states=(TrialState.RUNNING,))) >= 2

    try:
        _wait_for(running_of_victim, 150, "both workers running a trial", workers[1])
        workers[1].send_signal(signal.SIGKILL)  # dies mid-trial: no tell, no cleanup
        rc = workers[0].wait(timeout=200)
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
        for f in logs:
            f.close()
    out = (tmp_path / "worker0.log").read_text()
    assert rc == 0, out[-3000:]
    study = optuna.load_study(study_name="workers", storage=storage)
    complete = _check_run_folder(run, study, n)
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert len(failed) == 1  # the killed worker's trial, failed by the heartbeat check ...
    # ... and run again exactly once (or answered by an earlier trial of the same plan: a repeat)
    done = study.get_trials(states=(TrialState.COMPLETE,))
    retries = [t for t in done if t.system_attrs.get("failed_trial") == failed[0].number]
    assert len(retries) == 1, [(t.number, t.system_attrs) for t in done]
    # with what it had chosen (it may have died before suggesting every parameter)
    assert failed[0].params.items() <= retries[0].params.items()
    assert len({t.number for t in complete}) == n
    assert not study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))
    report = cli_here("report", run, "--storage", f"journal://{journal}")
    assert report.returncode == 0, report.stderr
