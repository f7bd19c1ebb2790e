"""Shared-storage workers on a real PostgreSQL server: a worker SIGKILLed mid-trial, and the database
going away mid-study (back within the retry window, ``workers.storage_retry_s``: the workers go on; gone
for longer: they stop with one line, and the same command resumes).

The server is ``AUTOCOMPRESS_TEST_POSTGRES_URL`` (``.ci/run`` starts one) or a throwaway one started
here from the distribution's binaries; the restart test always starts its own. Where neither can be had
the tests skip saying why, except under ``CI=true``, where they fail.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import test_cluster
from conftest import cli_env
from optuna.trial import TrialState
from pg_server import URL_ENV, PostgresServer, new_database, start_server
from reliability_helpers import check_referenced_folders, study_file

from autocompress.search.repeats import REPEAT_OF

pytestmark = pytest.mark.slow
ray_cluster = test_cluster.ray_cluster  # the local two-node Ray cluster fixture
IN_CI = os.environ.get("CI", "").lower() == "true"
RETRY_S = 30  # workers.storage_retry_s of the restart test's study
# the database down within that window: longer than the heartbeats' grace period (3 s), three failed
# reconnects (after 0.5, 1.5 and 3.5 s; the fourth, at 7.5 s, finds it back)
OUTAGE_S = 5


def _unavailable(why: str):
    if IN_CI:
        pytest.fail(f"CI=true but PostgreSQL is not available: {why}")
    pytest.skip(f"PostgreSQL not available: {why}")


def _own_server() -> PostgresServer:
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        _unavailable("psycopg2 is not installed (pip install -e '.[postgres]')")
    try:
        return start_server()
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        _unavailable(str(exc))


@pytest.fixture(scope="module")
def server_url():
    """The URL of a running server (CI's, else a throwaway one for this module)."""
    if os.environ.get(URL_ENV):
        yield os.environ[URL_ENV]
        return
    server = _own_server()
    try:
        yield server.url
    finally:
        server.cleanup()


@pytest.fixture
def own_server():
    """A server of this test's own, which it may stop and start."""
    server = _own_server()
    try:
        yield server
    finally:
        server.cleanup()


def _worker(study: Path, log: Path, env: dict | None = None, *args) -> subprocess.Popen:
    full = {**cli_env(), "PYTHONUNBUFFERED": "1", **(env or {})}
    for key in ("AUTOCOMPRESS_CRASH_AT", "AUTOCOMPRESS_FAULT"):
        full.pop(key, None)
    return subprocess.Popen(
        [sys.executable, "-m", "autocompress.cli", "worker", str(study), *map(str, args)],
        env=full,
        stdout=log.open("w"),
        stderr=(log.with_suffix(".err")).open("w"),
    )


def _wait_for(predicate, timeout_s: float, what: str, procs=()) -> None:
    t0 = time.monotonic()
    while not predicate():
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"worker exited ({p.returncode}) before {what}")
        if time.monotonic() - t0 > timeout_s:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _states(url: str, name: str) -> dict[TrialState, list[int]] | None:
    try:
        if name not in optuna.get_all_study_names(url):
            return None
        trials = optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)
    except Exception:  # the database is being created / is down
        return None
    out: dict[TrialState, list[int]] = {s: [] for s in TrialState}
    for t in trials:
        out[t.state].append(t.number)
    return out


def _check_final(run: Path, url: str, name: str, n: int) -> optuna.Study:
    """Exactly n completed trials, each with its whole folder, no folder without one, nothing running."""
    study = optuna.load_study(study_name=name, storage=url)
    # a repeat of an earlier plan (autocompress/search/repeats.py) completes with its results, runs
    # nothing and is not counted
    complete = [t for t in study.get_trials(states=(TrialState.COMPLETE,)) if REPEAT_OF not in t.user_attrs]
    assert len(complete) == n, [(t.number, t.state.name) for t in study.trials]
    assert not study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))
    assert sorted(p.name for p in (run / "trials").iterdir()) == sorted(f"{t.number:05d}" for t in complete)
    check_referenced_folders(run, study)
    # no plan counted twice: a retried trial's copy completes, the failed original does not
    retried_from = [t.system_attrs.get("failed_trial") for t in complete if "failed_trial" in t.system_attrs]
    assert len(retried_from) == len(set(retried_from))
    assert not set(retried_from) & {t.number for t in complete}
    return study


def _logs(tmp_path: Path, name: str) -> tuple[str, str]:
    return (tmp_path / f"{name}.log").read_text(), (tmp_path / f"{name}.err").read_text()


def test_two_workers_on_postgres_survive_a_killed_worker(tmp_path, server_url):
    n = 6
    url = new_database(server_url)
    path, run = study_file(
        tmp_path,
        "pgworkers",
        trials={"n": n},
        storage=url,
        workers={"heartbeat_interval_s": 1, "grace_period_s": 3, "max_retry": 2},
        backend__options__isolate=False,  # no latency checked: no timing worker beside each worker
    )
    workers = [_worker(path, tmp_path / f"w{i}.log") for i in range(2)]

    def both_running() -> bool:
        s = _states(url, "pgworkers")
        return s is not None and len(s[TrialState.COMPLETE]) >= 1 and len(s[TrialState.RUNNING]) >= 2

    try:
        _wait_for(both_running, 240, "both workers running a trial", workers)
        workers[1].send_signal(signal.SIGKILL)  # dies mid-trial: no tell, no cleanup
        rc = workers[0].wait(timeout=300)
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
            w.wait()
    out, err = _logs(tmp_path, "w0")
    assert rc == 0, out[-3000:] + err[-3000:]
    assert f"{n}/{n} trials completed" in out
    assert workers[1].returncode == -signal.SIGKILL
    study = _check_final(run, url, "pgworkers", n)
    (failed,) = study.get_trials(states=(TrialState.FAIL,))  # the killed worker's trial, failed by heartbeat
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    (retry,) = [t for t in complete if t.system_attrs.get("failed_trial") == failed.number]
    assert failed.params.items() <= retry.params.items()  # run again with what it had chosen
    assert not (run / "trials" / f"{failed.number:05d}").exists()
    assert not list((run / "trials").glob(".*"))


def test_database_restart_mid_study(tmp_path, own_server):
    n = 4
    url = new_database(own_server.url)
    path, run = study_file(
        tmp_path,
        "pgrestart",
        trials={"n": n},
        storage=url,
        # the retry window from the study file (workers.storage_retry_s); outages are scaled to it
        workers={"heartbeat_interval_s": 1, "grace_period_s": 3, "max_retry": 3, "storage_retry_s": RETRY_S},
        backend__options__isolate=False,  # no latency checked: no timing worker beside each worker
    )
    # 1. down within the retry window (5 s of 30 s: five heartbeat intervals, three failed reconnects):
    # both workers wait, reconnect and go on
    workers = [_worker(path, tmp_path / f"a{i}.log") for i in range(2)]
    try:
        _wait_for(
            lambda: (
                (s := _states(url, "pgrestart")) is not None
                and len(s[TrialState.COMPLETE]) >= 1
                and len(s[TrialState.RUNNING]) >= 1
            ),
            240,
            "a trial completed and one running",
            workers,
        )
        before = set(_states(url, "pgrestart")[TrialState.COMPLETE])
        own_server.stop()
        time.sleep(OUTAGE_S)
        assert all(w.poll() is None for w in workers), "a worker gave up within the retry window"
        own_server.start()
        rcs = [w.wait(timeout=300) for w in workers]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
            w.wait()
    logs = [_logs(tmp_path, f"a{i}") for i in range(2)]
    assert rcs == [0, 0], [log[0][-2000:] + log[1][-2000:] for log in logs]
    for out, err in logs:
        assert "unreachable" in out and "reachable again after" in out, out[-3000:]
        assert f"retrying for up to {RETRY_S} s" in out, out[-3000:]  # the study file's window
        assert "Traceback" not in err, err[-3000:]
    study = _check_final(run, url, "pgrestart", n)
    assert before <= {t.number for t in study.get_trials(states=(TrialState.COMPLETE,))}  # none lost

    # 2. gone for longer than the retry window (4 s here: the environment variable overrides the study
    # file's 30 s): each worker stops with one line; the command resumes
    n2 = n + 3
    env = {"AUTOCOMPRESS_STORAGE_RETRY_S": "4"}
    workers = [_worker(path, tmp_path / f"b{i}.log", env, "--n-trials", n2) for i in range(2)]
    try:
        _wait_for(
            lambda: (s := _states(url, "pgrestart")) is not None and len(s[TrialState.RUNNING]) >= 1,
            240,
            "a trial of the second round running",
            workers,
        )
        before = set(_states(url, "pgrestart")[TrialState.COMPLETE])
        own_server.stop()
        rcs = [w.wait(timeout=300) for w in workers]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
            w.wait()
    own_server.start()
    for i, rc in enumerate(rcs):
        out, err = _logs(tmp_path, f"b{i}")
        assert rc == 1, out[-2000:] + err[-2000:]
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
        assert errors[0].startswith("error: StorageUnavailable: the storage postgresql+psycopg2://")
        assert "has been unreachable for" in errors[0] and "run the same command again" in errors[0]
    again = _worker(path, tmp_path / "c.log", None, "--n-trials", n2)
    rc = again.wait(timeout=400)
    out, err = _logs(tmp_path, "c")
    assert rc == 0, out[-3000:] + err[-3000:]
    assert f"{n2}/{n2} trials completed" in out
    study = _check_final(run, url, "pgrestart", n2)
    assert before <= {t.number for t in study.get_trials(states=(TrialState.COMPLETE,))}
    # the trials the stopped workers left running were failed by their stale heartbeat and run again
    for t in study.get_trials(states=(TrialState.FAIL,)):
        copies = [c for c in study.trials if c.system_attrs.get("failed_trial") == t.number]
        assert len(copies) == 1 and copies[0].state == TrialState.COMPLETE, t.number


def test_ray_cluster_on_postgres_survives_a_lost_node(tmp_path, server_url, ray_cluster):
    n = 4  # as in test_cluster: the node goes once two trials run at once
    url = new_database(server_url)
    study_file, run = test_cluster._study_file(
        tmp_path,
        "raypg",
        n,
        storage=url,
        ray={"cpus_per_trial": 1, "max_concurrent": 2, "max_failures": 3},
    )
    log = tmp_path / "driver.log"
    with log.open("w") as f:
        driver = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "autocompress.cli",
                "run",
                str(study_file),
                "--ray",
                ray_cluster["address"],
            ],
            env=ray_cluster["env"],
            stdout=f,
            stderr=subprocess.STDOUT,
        )
        try:
            # one CPU per node and per trial: two trials running at once means one runs on the worker node
            test_cluster._wait_for(
                lambda: len(test_cluster._running_dirs(run)) >= 2, 200, "two trials", driver
            )
            test_cluster._kill_node(ray_cluster["worker"])
            rc = driver.wait(timeout=300)
        finally:
            if driver.poll() is None:
                driver.kill()
            driver.wait()
    out = log.read_text()
    assert rc == 0, out[-3000:]
    assert f"{n}/{n} trials completed" in out
    study = optuna.load_study(study_name="raypg", storage=url)
    test_cluster._check_run_folder(run, study, n)
    assert not (run / "study.db").exists()  # the study lives in PostgreSQL only
    assert not study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))
    assert [p for p in (run / "ray").rglob("error*.txt")], "no trial was lost with the node"


SECRET = "s3cretPW"


def test_the_documented_postgresql_url_with_a_password_runs_and_never_shows_it(tmp_path, server_url):
    """``storage: postgresql://user:password@host:port/db``, the form studies/quickstart.yaml documents
    (SQLAlchemy 2 runs it with psycopg 3, which the [postgres] extra installs), on a real server; its
    password appears in nothing the run prints or writes: the run folder, the report, the study's and
    the trials' stored attributes. (The test server trusts 127.0.0.1: any password is accepted.)"""
    from sqlalchemy.engine import make_url

    db = make_url(new_database(server_url))
    url = db.set(drivername="postgresql", password=SECRET).render_as_string(hide_password=False)
    assert url.startswith("postgresql://") and SECRET in url
    assert make_url(url).get_dialect().driver == "psycopg"  # what the plain form needs
    path, run = study_file(tmp_path, "pgplain", trials={"n": 1}, storage=url, backend__options__isolate=False)
    proc = subprocess.run(
        [sys.executable, "-m", "autocompress.cli", "run", str(path)],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1/1 trials completed" in proc.stdout
    report = subprocess.run(
        [sys.executable, "-m", "autocompress.cli", "report", str(run), "--storage", url],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=300,
    )
    assert report.returncode == 0, report.stderr[-3000:]
    for text in (proc.stdout, proc.stderr, report.stdout, report.stderr):
        assert SECRET not in text
    written = [p for p in run.rglob("*") if p.is_file()]
    assert run / "study.yaml" in written and run / "report.html" in written
    for p in written:
        assert SECRET.encode() not in p.read_bytes(), p
    assert "postgresql://postgres:***@" in (run / "study.yaml").read_text()
    storage = optuna.storages.RDBStorage(url)
    study = optuna.load_study(study_name="pgplain", storage=storage)
    assert study.user_attrs["config"]["storage"] == url.replace(SECRET, "***")
    study_id = storage.get_study_id_from_name("pgplain")
    stored = [study.user_attrs, storage.get_study_system_attrs(study_id)]
    stored += [a for t in study.trials for a in (t.user_attrs, t.system_attrs)]
    assert SECRET not in json.dumps(stored, default=str)
