"""Crash safety and trial isolation with real processes: SIGKILL at chosen points (environment hook)
and at a random moment from outside, then the same command again; faulty trials fail alone."""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path

import pytest
from optuna.trial import TrialState
from refusal_helpers import ours
from reliability_helpers import (
    check_consistent,
    check_referenced_folders,
    cli,
    cli_here,
    load,
    popen,
    study_file,
)

from autocompress.backends.timing import lock_dir
from autocompress.scratch import SCRATCH

pytestmark = pytest.mark.slow

# (crash point, trial it hits). Each run resumes the previous one: the interrupted trial k is retried
# as k + 1, then trial k + 2 is killed at the next point.
CHAIN = [
    ("finetune", 1),
    ("export", 3),
    ("measure", 5),
    ("artifact_write", 7),
    ("renamed", 9),
]


def private_temp(tmp_path: Path) -> tuple[Path, dict]:
    """A temp folder of the test's own (``TMPDIR`` of the processes it starts), and their environment;
    the device lock stays the machine's (timing is serialized with every other process)."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    return tmp, {"TMPDIR": str(tmp), "AUTOCOMPRESS_LOCK_DIR": str(lock_dir())}


def test_kill_at_every_point_then_resume(tmp_path):
    path, run = study_file(tmp_path, trials={"n": 7})
    tmp, env = private_temp(tmp_path)
    for point, number in CHAIN:
        proc = cli("run", path, env={**env, "AUTOCOMPRESS_CRASH_AT": f"{point}@{number}"})
        assert proc.returncode == -signal.SIGKILL, (point, proc.returncode, proc.stderr[-2000:])
        assert not ours(tmp), (point, ours(tmp))  # nothing of the run
        study = load(run)
        trial = study.trials[number]
        assert trial.state == TrialState.RUNNING, (point, trial.state)  # left RUNNING by the dead process
        # ... and no completed trial points to a partial folder, even before any cleanup
        check_referenced_folders(run, study)
        if point == "renamed":  # whole folder in place, but its trial never completed
            assert (run / "trials" / f"{number:05d}").is_dir()
        if point in ("measure", "artifact_write"):
            assert (run / "trials" / f".{number:05d}.tmp").is_dir()
    # the last run: killed while rebuilding pareto/ after the search
    proc = cli("run", path, env={**env, "AUTOCOMPRESS_CRASH_AT": "pareto_export"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (run / ".pareto.tmp").is_dir()
    final = cli("run", path, env=env)
    assert final.returncode == 0, final.stderr[-3000:]
    assert not ours(tmp) and not (run / SCRATCH).exists()
    assert "removed what an interrupted run left behind: .pareto.tmp" in final.stdout
    study = check_consistent(run, 7)
    interrupted = [t.number for t in study.trials if t.user_attrs.get("fail_category") == "interrupted"]
    assert interrupted == [n for _, n in CHAIN]
    for n in interrupted:
        assert study.trials[n].user_attrs["fail_reason"] == "interrupted: the process running it died"
        retry = study.trials[n + 1]
        assert retry.user_attrs["retry_of"] == n and retry.state == TrialState.COMPLETE
        assert retry.user_attrs["plan"] == study.trials[n].user_attrs["plan"]
    report = cli_here("report", run)
    assert report.returncode == 0 and "interrupted" in report.stdout


def test_killed_during_the_latency_profile_leaves_nothing_in_the_temp_folder(tmp_path):
    """The profile's artifacts and the timing inputs live in the run folder's scratch folder, which the
    next run clears: a SIGKILL leaves nothing in the system's temp folder; the profile (after the first
    trial, int8 everywhere) runs again on resume; the retry of the planned trial that was killed keeps its
    planned record (predicted vs measured)."""
    path, run = study_file(tmp_path, trials={"n": 2, "planned_starts": 2}, budgets={"max_metric_drop": 0.5})
    tmp, env = private_temp(tmp_path)
    proc = cli("run", path, env={**env, "AUTOCOMPRESS_CRASH_AT": "profile"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not ours(tmp), ours(tmp)
    assert [p.name.split("-")[1] for p in (run / SCRATCH).iterdir()] == ["profile"]
    study = load(run)
    assert study.trials[0].state == TrialState.COMPLETE and "fixed_plan" in study.trials[0].user_attrs
    assert study.user_attrs["setup_stage"] == "early"  # the set-up's second stage is still due
    # killed inside the planned trial (writing its artifact: its latency may come from the profile's
    # cache, so it need not be timed at all)
    proc = cli("run", path, env={**env, "AUTOCOMPRESS_CRASH_AT": "artifact_write@1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not ours(tmp), ours(tmp)
    study = load(run)
    assert study.user_attrs["setup_stage"] == "done"
    assert study.trials[1].state == TrialState.RUNNING
    assert "planned" in study.trials[1].user_attrs, study.trials[1].user_attrs
    final = cli("run", path, env=env)
    assert final.returncode == 0, final.stderr[-3000:]
    assert not ours(tmp) and not (run / SCRATCH).exists()
    assert "latency profile:" not in final.stdout  # the second stage ran once
    study = load(run)
    retry = study.trials[2]
    assert retry.user_attrs["retry_of"] == 1 and retry.state == TrialState.COMPLETE
    assert retry.user_attrs["planned"] == study.trials[1].user_attrs["planned"]
    assert f"planned trial 2 ('{retry.user_attrs['planned']['name']}')" in final.stdout


def test_a_first_trial_killed_is_retried_with_its_plan(tmp_path):
    """A first trial (a fixed plan, no Optuna parameters) killed mid-way is queued again with its plan
    and post-training mark, and runs before the set-up's second stage."""
    path, run = study_file(tmp_path, trials={"n": 2, "planned_starts": 2}, budgets={"max_metric_drop": 0.5})
    tmp, env = private_temp(tmp_path)
    proc = cli("run", path, env={**env, "AUTOCOMPRESS_CRASH_AT": "measure@0"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    final = cli("run", path, env=env)
    assert final.returncode == 0, final.stderr[-3000:]
    study = check_consistent(run, 2)
    first, retry = study.trials[0], study.trials[1]
    assert first.state == TrialState.FAIL and retry.user_attrs["retry_of"] == 0
    assert retry.state == TrialState.COMPLETE and retry.params == {}
    assert retry.user_attrs["plan"] == first.user_attrs["fixed_plan"] == retry.user_attrs["fixed_plan"]
    assert retry.user_attrs["post_training"] and retry.user_attrs["plan"]["steps"] == 0
    assert final.stdout.index("[1/2] trial 1") < final.stdout.index("latency profile:")


def test_sigkill_from_outside_at_a_random_moment(tmp_path):
    seed = int(time.time())
    delay = random.Random(seed).uniform(0.0, 4.0)
    path, run = study_file(tmp_path, trials={"n": 5})
    proc = popen("run", path, env={"PYTHONUNBUFFERED": "1"})
    seen = []
    for line in proc.stdout:  # wait for the search to start, then kill at a random moment
        seen.append(line.strip())
        if line.startswith("[1/5]"):
            break
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    print(f"killed {delay:.2f} s after the first trial (seed {seed}); last line: {seen[-1]}")
    check_referenced_folders(run, load(run))
    final = cli("run", path)
    assert final.returncode == 0, final.stderr[-3000:]
    check_consistent(run, 5)


def test_faulty_trials_fail_alone_with_a_reason(tmp_path):
    # the hanging trial waits out trials.trial_timeout_s; the others take well under a second here
    path, run = study_file(tmp_path, trials={"n": 3, "trial_timeout_s": 3.0}, backend__options__isolate=False)
    faults = "raise@1,nan@2,export@3,ort_load@4,hang@5"
    proc = cli("run", path, env={"AUTOCOMPRESS_FAULT": faults})
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = load(run)
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE"] + ["FAIL"] * 5 + ["COMPLETE"] * 2, states
    got = {t.number: (t.user_attrs["fail_category"], t.user_attrs["fail_reason"]) for t in study.trials[1:6]}
    assert got[1] == ("exception (RuntimeError)", "RuntimeError: injected fault: the trial raised")
    assert got[2][0] == "non-finite loss" and got[2][1].startswith(
        "NonFiniteLoss: non-finite fine-tuning loss"
    )
    assert got[3][0] == "export failed" and got[3][1].startswith("ExportError: torch.onnx.export failed")
    assert got[4][0] == "runtime load failed" and "onnxruntime could not load" in got[4][1]
    assert got[5] == (
        "timeout",
        f"TrialTimeout: exceeded trials.trial_timeout_s = 3 s during fine-tuning (step {got[5][1].split('step ')[1]}",
    )
    for t in study.trials[1:6]:
        assert "\n" not in t.user_attrs["fail_reason"] and "Traceback" in t.user_attrs["traceback"]
        assert not (run / "trials" / f"{t.number:05d}").exists()
    check_consistent(run, 3)
    report = cli_here("report", run)
    assert report.returncode == 0, report.stderr
    table = report.stdout.split("failed trials by reason:")[1]
    for category in (
        "exception (RuntimeError)",
        "non-finite loss",
        "export failed",
        "runtime load failed",
        "timeout",
    ):
        assert category in table, table
    assert "runtime load failed" in (run / "trials.csv").read_text()
