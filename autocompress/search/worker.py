"""``autocompress worker``: one of N processes (on N hosts) that share one study through its storage.

There is no coordinator: every worker asks the shared Optuna study for its next trial, runs the same
objective as a local run (:func:`~autocompress.search.runner.execute_trial`) and tells the result.
What keeps N workers honest is Optuna's:

* the sampler sees every worker's finished trials, because they are in the shared storage;
* each running trial records a heartbeat (Optuna's heartbeat thread); before asking, a worker calls
  :func:`optuna.storages.fail_stale_trials`, which fails the trials of dead workers (no heartbeat within
  the grace period) and, through :class:`optuna.storages.RetryHeartbeatStaleTrialCallback`, queues a copy
  of each (same parameters) that the next ``ask`` picks up;
* the study's first trials (the peers' one-call answers) are enqueued by the worker that creates the
  study; the first worker that finds none of them waiting runs the rest of the set-up (applicability,
  profile, planned starts: :mod:`.first_trials`) under the run folder's set-up lock, once, while the
  others finish theirs or wait for it, then narrow their own space from the study;
* a worker asks only while ``completed + running < trials.n``; this check and the ask hold the run
  folder's ``ask.lock`` (a file lock, shared by the hosts that mount the run folder), so the study stops
  at exactly ``trials.n`` completed trials. A worker whose host cannot see that lock can overshoot by at
  most one trial per such worker.
"""

from __future__ import annotations

import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import optuna
from filelock import FileLock
from optuna.trial import TrialState

from ..config import StudyConfig
from ..deadline import run_clock, run_remaining
from ..optuna_compat import fail_stale_trials, first_heartbeat, heartbeat, storage_of, trial_id
from ..rundir import ASK_LOCK, SETUP_LOCK, TRIALS, trial_dir
from .first_trials import complete_setup, setup_due, sync_domains
from .preflight import trial_target
from .progress import Progress
from .repeats import is_repeat
from .run_setup import open_run
from .runner import RunSummary, execute_trial, make_fidelity


def _counts(study: optuna.Study) -> dict[TrialState, int]:
    """Trials per state; a repeat of a model already measured (search/repeats.py) is not counted."""
    out = dict.fromkeys(TrialState, 0)
    for t in study.get_trials(deepcopy=False):
        out[t.state] += not is_repeat(t)
    return out


def _remove_partial_folders(study: optuna.Study, run_dir: Path) -> None:
    """The half-written folders of trials whose worker died (their retries get new numbers)."""
    trials_dir = run_dir / TRIALS
    if not trials_dir.is_dir():
        return
    for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        shutil.rmtree(trials_dir / f".{t.number:05d}.tmp", ignore_errors=True)
        # renamed into place by a worker that then lost the storage or died before telling it
        shutil.rmtree(trials_dir / f"{t.number:05d}", ignore_errors=True)


def _next_trial(ctx, study: optuna.Study, n_target: int) -> tuple[optuna.Trial | None, bool, bool]:
    """(trial to run or None, whether the study is done, whether the set-up's second stage is due: the
    first trials all started, :mod:`.first_trials`). Call holding the ask lock."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fail_stale_trials is experimental; ask warns about heartbeats
        fail_stale_trials(study)
        _remove_partial_folders(study, ctx.run_dir)
        counts = _counts(study)
        if counts[TrialState.COMPLETE] >= n_target:
            return None, True, False
        if counts[TrialState.COMPLETE] + counts[TrialState.RUNNING] >= n_target:
            return None, False, False  # enough trials under way: wait for them (one may die and come back)
        if setup_due(study):  # the sampler must not ask in domains the stage has yet to narrow
            return None, False, True
        sync_domains(ctx, study)  # narrowed by the worker that ran the second stage
        trial = study.ask()
        first_heartbeat(trial, study)  # inside the ask lock: no RUNNING trial is left without a beat
        return trial, False, False


def run_worker(
    cfg: StudyConfig, *, n_trials: int | None = None, log: Callable[[str], None] = print
) -> RunSummary:
    """Join the study of ``cfg`` through its (shared) storage and run trials until it has ``n_trials``.

    The first worker to start trains the teacher, measures the baseline and creates the study (under
    the run folder's setup lock); the others load them. Every worker then runs trials until the study
    has ``n_trials`` completed trials, then writes the report.
    """
    from ..export import export_front
    from ..report_html import write_report

    n_target = trial_target(cfg, n_trials)
    with run_clock(cfg.trials.timeout_s), open_run(cfg, log, exclusive=False) as (ctx, study):
        fidelity = make_fidelity(ctx, study)
        gate = FileLock(str(ctx.run_dir / ASK_LOCK))
        done = _counts(study)[TrialState.COMPLETE]
        progress = Progress(n_target, done, log)
        poll_s = min(2.0, cfg.workers.heartbeat_interval_s / 2)
        failures, stopped = 0, "done"
        while True:
            left = run_remaining()
            if left is not None and left <= 0:
                stopped = "timeout"
                log(f"wall-time budget of {cfg.trials.timeout_s:g} s (this worker's set-up included) reached")
                break
            with gate:
                trial, finished, setup = _next_trial(ctx, study, n_target)
            if finished:
                break
            if setup:  # the first worker here runs the set-up's second stage; the others wait for it
                complete_setup(ctx, study, log)
                continue
            if trial is None:
                time.sleep(poll_s)
                continue
            with heartbeat(trial, study):
                try:
                    state, metrics, reason = execute_trial(ctx, study, trial, fidelity)
                except (optuna.exceptions.UpdateFinishedTrialError, ValueError) as exc:
                    now = storage_of(study).get_trial(trial_id(trial)).state
                    if now == TrialState.RUNNING or (
                        isinstance(exc, ValueError) and not str(exc).startswith("Cannot tell a")
                    ):
                        raise
                    if now == TrialState.FAIL:
                        # another worker failed it (its heartbeats did not reach the storage, e.g. while
                        # the database was away) and queued a copy: that copy counts, this result does not
                        shutil.rmtree(trial_dir(ctx.run_dir, trial.number), ignore_errors=True)
                        log(f"trial {trial.number} was failed by another worker meanwhile (heartbeats lost)")
                    # else: told once already (a retried call whose first answer was lost): it counts as is
                    continue
            done = _counts(study)[TrialState.COMPLETE]
            progress.trial(study, done, trial.number, metrics, reason, pruned=state == TrialState.PRUNED)
            if state == TrialState.FAIL:
                failures += 1
                if failures > cfg.trials.max_failures:
                    stopped = "failures"
                    log(
                        f"stopping: {failures} failed trials (trials.max_failures = {cfg.trials.max_failures})"
                    )
                    break
        with FileLock(str(ctx.run_dir / SETUP_LOCK)):
            export_front(study, ctx.run_dir)
            write_report(study, ctx.run_dir)
        completed = _counts(study)[TrialState.COMPLETE]
        log(f"{completed}/{n_target} trials completed; results in {ctx.run_dir}/")
        return RunSummary(study, completed, n_target, stopped)
