"""The local study runner: ask a trial, run it, tell the study, until the study has its trials.

Setting the run up (validation, teacher, baseline, the study) is :mod:`.run_setup`; the progress line
is :mod:`.progress`; the full-set re-scoring of the front is :func:`.costs.score_front_fully`.
"""

from __future__ import annotations

import dataclasses
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import optuna
from optuna.trial import TrialState

from ..backends.device_facts import environment
from ..config import StudyConfig
from ..deadline import run_clock, run_elapsed, run_remaining
from ..errors import RunFolderUnwritable, failure_category
from ..faults import crash_point
from ..objective import RunContext, run_trial
from ..optuna_compat import storage_of
from ..pareto import OBJECTIVES, constraint_values
from ..plan import Plan
from ..rundir import trial_dir
from ..tasks import Task
from .costs import _fmt_s, score_front_fully
from .first_trials import FIXED_PLAN, complete_setup, setup_due
from .housekeeping import discard_dominated_folders, retry_attrs
from .multifidelity import Fidelity
from .one_shot import POST_TRAINING
from .planned_starts import prediction_line
from .preflight import trial_target
from .progress import Progress
from .repeats import MAX_REPEATS_IN_A_ROW, REPEAT_OF, find_repeat, is_repeat, repeat_metrics
from .run_setup import open_run


@dataclass
class RunSummary:
    """What :func:`run_study` did: the study, completed vs requested trials, and why it stopped."""

    study: optuna.Study
    completed: int
    requested: int
    stopped: str  # "done", "timeout", "failures", "stop_after" or "repeats" (nothing new proposed)


def suggest_plan(ctx: RunContext, trial: optuna.Trial) -> Plan:
    """The trial's plan (every parameter suggested), also stored in the trial's user attrs.

    A trial enqueued as post-training (user attr ``post_training``: the one-shot int8 starts) gets 0
    fine-tune steps; one enqueued with its plan (user attr ``fixed_plan``: the study's first trials,
    :mod:`.first_trials`) runs that plan and suggests no parameter."""
    cfg = ctx.config
    post_training = bool(trial.user_attrs.get(POST_TRAINING))
    if FIXED_PLAN in trial.user_attrs:
        plan = Plan.from_dict(trial.user_attrs[FIXED_PLAN])
    else:
        plan = ctx.space.suggest(
            trial,
            ctx.inventory,
            epochs=cfg.finetune.epochs,
            steps=0 if post_training else cfg.finetune.steps,
            lr=cfg.finetune.lr,
            seed=cfg.seed,
        )
    if cfg.finetune.lr_schedule != plan.lr_schedule:
        plan = dataclasses.replace(plan, lr_schedule=cfg.finetune.lr_schedule)
    trial.set_user_attr("plan", plan.to_dict())
    # what a rebuild needs besides the plan: seed, threads, library versions, device
    trial.set_user_attr("seed", cfg.seed)
    trial.set_user_attr("finetune_threads", cfg.finetune.threads)
    backend = getattr(ctx, "backend", None)  # the Ray searcher passes a namespace without one
    if backend is not None:
        trial.set_user_attr("environment", environment(backend))
    return plan


def record_success(ctx: RunContext, trial: optuna.Trial, metrics: dict) -> list[float]:
    """Store a trial's metrics and budget constraints in the trial; return its objective values."""
    for key in RECORDED:
        if key in metrics:
            trial.set_user_attr(key, metrics[key])
    trial.set_user_attr("artifact", os.path.relpath(metrics["artifact"], ctx.run_dir))
    for key, value in constraint_values(metrics, ctx.config.budgets.model_dump()).items():
        trial.set_constraint(key, value)
    return [metrics[k] for k in OBJECTIVES]


def record_failure(trial: optuna.Trial, exc: BaseException) -> str:
    """Store why a trial failed (one line + the traceback's tail); return the one-line reason."""
    reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:500]
    trial.set_user_attr("fail_reason", reason)
    trial.set_user_attr("fail_category", failure_category(exc))
    trial.set_user_attr("traceback", traceback.format_exc()[-4000:])
    return reason


RECORDED = (
    "metric",
    "metric_name",
    "metric_drop_rel",
    "baseline_metric",
    "disk_bytes",
    "latency_ms",
    "latency_p90_ms",
    "latency",
    "baseline_latency",  # the baseline's stats timed beside this trial's artifact (the speedup's denominator)
    "latency_cached",
    "environment",
    "size_bytes",
    "speedup",
    "size_ratio",
    "metric_drop",
    "packed_size_bytes_theoretical",
    "compact_weights",  # shared / sparse weights: the format and bytes of each
    "entropy_coded_bytes_lzma",  # the artifact entropy-coded (labelled: never the size objective)
    "kernels",
    "notes",
    "seconds",
    "kept",
    "holdout_post_training",
    "holdout_finetuned",
    "finetune_skipped",
    "finetune_steps",  # the steps the trial's fine-tune was given (its share of the run's time left)
)


def run_study(
    cfg: StudyConfig,
    *,
    task: Task | None = None,
    n_trials: int | None = None,
    log: Callable[[str], None] = print,
    stop_after: int | None = None,
) -> RunSummary:
    """Run (or resume) a study until it has ``n_trials`` completed trials, then export and report.

    Args:
        cfg: the validated study config.
        task: a live Task (a trained model, DataLoaders, a metric) instead of the file's ``task.name``.
        n_trials: overrides ``cfg.trials.n``.
        log: where progress lines go.
        stop_after: stop after this many new trials in this call (used to test resuming).
    """
    n_target = trial_target(cfg, n_trials)
    with run_clock(cfg.trials.timeout_s), open_run(cfg, log, task=task) as (ctx, study):
        _log_setup_time(cfg, log)
        stopped = _loop(ctx, study, n_target, stop_after, log)
        if stopped != "timeout" or ctx.eval_limit() is None:
            score_front_fully(ctx, study, log)
        else:
            log("the front's models keep their subset scores (no time left to score the whole eval set)")
        return finish_run(ctx, study, n_target, stopped, log)


def _log_setup_time(cfg: StudyConfig, log) -> None:
    """Say how much of the wall-time budget the set-up used (the budget covers the whole run)."""
    spent, left = run_elapsed(), run_remaining()
    if spent is not None and left is not None:
        log(
            f"set-up took {_fmt_s(spent)} of the {_fmt_s(cfg.trials.timeout_s)} wall-time budget "
            f"(trials.timeout_s); {_fmt_s(max(left, 0.0))} left for trials"
        )


def finish_run(ctx: RunContext, study: optuna.Study, n_target: int, stopped: str, log) -> RunSummary:
    """After the last trial: export the front, write the report, say where the results are."""
    from ..export import export_front
    from ..report_html import write_report

    export_front(study, ctx.run_dir)
    write_report(study, ctx.run_dir)
    completed = complete_count(study)
    log(
        f"{completed}/{n_target} trials completed; results in {ctx.run_dir}/ (trials.csv, pareto.png, pareto/)"
    )
    return RunSummary(study, completed, n_target, stopped)


def make_fidelity(ctx: RunContext, study: optuna.Study) -> Fidelity | None:
    """The study's early stopping (None when ``early_stopping.name`` is ``none``)."""
    if ctx.config.early_stopping.name == "none":
        return None
    return Fidelity(ctx.config, storage_of(study), ctx.held_out())


def execute_trial(
    ctx: RunContext, study: optuna.Study, trial: optuna.Trial, fidelity: Fidelity | None = None
) -> tuple[TrialState, dict | None, str]:
    """Run one asked trial end to end and tell the study: (state, metrics or None, reason).

    A failing trial is recorded with its reason; a pruned one (``fidelity``) keeps its last held-out
    accuracy; neither stops the caller.
    """
    try:
        t0 = time.perf_counter()
        plan = suggest_plan(ctx, trial)
        repeat = _tell_repeat(ctx, study, trial, plan, t0)
        if repeat is not None:
            return TrialState.COMPLETE, repeat, ""
        hook = fidelity.on_epoch(trial) if fidelity else None
        metrics = run_trial(ctx, plan, trial_dir(ctx.run_dir, trial.number), on_epoch=hook)
    except optuna.TrialPruned as exc:
        trial.set_user_attr("prune_reason", str(exc))
        study.tell(trial, state=TrialState.PRUNED)
        if fidelity:
            fidelity.finish(trial, TrialState.PRUNED)
        return TrialState.PRUNED, None, str(exc)
    except Exception as exc:  # one trial's failure never stops the study ...
        reason = record_failure(trial, exc)
        study.tell(trial, state=TrialState.FAIL)
        if fidelity:
            fidelity.finish(trial, TrialState.FAIL)
        if isinstance(exc, RunFolderUnwritable):  # ... but a full disk would fail every next one: stop
            retry = retry_attrs(trial.user_attrs, trial.number)
            study.enqueue_trial(trial.params, user_attrs=retry, skip_if_exists=False)
            raise
        return TrialState.FAIL, None, reason
    study.tell(trial, record_success(ctx, trial, metrics))
    crash_point("told", trial=trial.number)
    if fidelity:
        fidelity.finish(trial, TrialState.COMPLETE)
    return TrialState.COMPLETE, metrics, ""


def _tell_repeat(
    ctx: RunContext, study: optuna.Study, trial: optuna.Trial, plan: Plan, t0: float
) -> dict | None:
    """When ``plan`` builds a model a completed trial measured (:mod:`.repeats`): record that trial's
    results on this one (user attr ``repeat_of``), tell the study, return the metrics; else None."""
    kinds = {i.name: i.kind for i in ctx.inventory}
    original = find_repeat(study, plan.to_dict(), kinds, trial.number)
    if original is None:
        return None
    trial.set_user_attr(REPEAT_OF, original.number)
    metrics = repeat_metrics(ctx, original, RECORDED, t0)
    record_success(ctx, trial, metrics)
    study.tell(trial, list(original.values))
    return metrics


def complete_count(study: optuna.Study) -> int:
    """Completed trials that measured a model of their own (a repeat of an earlier plan does not count)."""
    return sum(not is_repeat(t) for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


def _loop(ctx: RunContext, study: optuna.Study, n_target: int, stop_after: int | None, log) -> str:
    cfg = ctx.config
    done = complete_count(study)
    if done >= n_target:
        log(f"study already has {done} completed trials (asked for {n_target}): nothing to run")
        return "done"
    progress = Progress(n_target, done, log)
    progress.cache = ctx.latency_cache
    failures = ran = repeats = 0
    fidelity = make_fidelity(ctx, study)
    while done < n_target:
        left = run_remaining()
        if left is not None and left <= 0:
            log(
                f"wall-time budget of {cfg.trials.timeout_s:g} s (set-up included) reached after {done} trials"
            )
            return "timeout"
        if stop_after is not None and ran >= stop_after:
            return "stop_after"
        if setup_due(study):  # the first trials are done: the applicability check and the profile
            t0 = time.perf_counter()
            complete_setup(ctx, study, log)
            left = run_remaining()
            budget = f"; {_fmt_s(max(left, 0.0))} of the wall-time budget left" if left is not None else ""
            log(f"the rest of the set-up took {_fmt_s(time.perf_counter() - t0)}{budget}")
            continue
        trial = study.ask()
        ran += 1
        ctx.trials_left = n_target - done
        state, metrics, reason = execute_trial(ctx, study, trial, fidelity)
        if state == TrialState.FAIL:
            failures += 1
            progress.trial(study, done, trial.number, None, reason)
            if failures > cfg.trials.max_failures:
                log(f"stopping: {failures} failed trials (trials.max_failures = {cfg.trials.max_failures})")
                return "failures"
            continue
        if state == TrialState.PRUNED:
            progress.trial(study, done, trial.number, None, reason, pruned=True)
            continue
        if REPEAT_OF in trial.user_attrs:  # not run: an earlier trial measured the same model
            repeats += 1
            log(
                f"trial {trial.number}: the same model as trial {trial.user_attrs[REPEAT_OF]} (its plan differs "
                "only in settings that change nothing): not run again, its results recorded"
            )
            if repeats >= MAX_REPEATS_IN_A_ROW:
                log(f"stopping: the sampler proposed {repeats} models already measured in a row")
                return "repeats"
            continue
        repeats = 0
        if cfg.trials.keep == "pareto":
            discard_dominated_folders(study, ctx.run_dir, log)
        done += 1
        progress.trial(study, done, trial.number, metrics)
        planned = prediction_line(trial.number, trial.user_attrs)
        if planned:
            log(planned)
        try:
            from ..report import write_trials_table  # pandas: imported when the first table is written

            write_trials_table(study, ctx.run_dir)
        except OSError as exc:  # a full disk must not end a long run; the final report retries
            log(f"warning: could not update trials.csv: {exc}")
    return "done"
