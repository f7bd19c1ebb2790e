"""The local study runner: validate, prepare the run folder, then ask/tell trials with Optuna."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import os
import shutil
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
import torch
from filelock import FileLock, Timeout
from optuna.trial import TrialState

from ..backends import BACKENDS, Backend, LatencyCache
from ..backends.cache import cache_path
from ..config import StudyConfig, resolve_space_file
from ..errors import AutoCompressError, ConfigError, RunFolderUnwritable, failure_category
from ..faults import crash_point
from ..inventory import build_inventory
from ..objective import RunContext, environment, measure_baseline, run_trial, write_json, write_text_atomic
from ..pareto import OBJECTIVES, constraint_values, objectives_for
from ..plan import Plan
from ..report import write_trials_table
from ..space import SearchSpace
from ..tasks import Task, load_task, validate_task
from .costs import _fmt_s, estimate_trial_s, score_front_fully  # noqa: F401 - re-exported
from .fidelity import Fidelity, make_pruner
from .housekeeping import clean_run_dir, prune_dominated
from .preflight import check_budgets, check_output, check_storage
from .samplers import make_sampler
from .storage import check_storage_url, make_storage
from .teacher import teacher_for_run

DIRECTIONS = ["maximize" if s > 0 else "minimize" for s in OBJECTIVES.values()]


def directions_for(task: Task) -> list[str]:
    """Optuna directions of a study on ``task``: its metric's direction, then latency and size (min)."""
    return ["maximize" if s > 0 else "minimize" for s in objectives_for(task.metric_obj.sign).values()]


@dataclass
class RunSummary:
    """What :func:`run_study` did: the study, completed vs requested trials, and why it stopped."""

    study: optuna.Study
    completed: int
    requested: int
    stopped: str  # "done", "timeout", "failures" or "stop_after"


@dataclass
class Prepared:
    """Everything validated before the run folder is touched."""

    config: StudyConfig
    task: Task
    space: SearchSpace
    backend: Backend
    sampler: optuna.samplers.BaseSampler


def prepare(cfg: StudyConfig, task: Task | None = None) -> Prepared:
    """Validate every part of a study that can be checked without writing anything.

    ``task``: a live :class:`~autocompress.Task` (from Python) instead of the study file's ``task.name``.

    Raises:
        ConfigError: naming the study file, the field and the rule.
    """
    src = cfg.source
    try:
        backend_cls = BACKENDS.get(cfg.backend.name)
    except ConfigError as exc:
        raise exc.at(src, "backend.name") from None
    space_file = resolve_space_file(cfg)
    space = SearchSpace.from_file(space_file, cfg.space.overrides, src)
    bad = sorted(space.bit_widths() - set(backend_cls.stored_bits))
    if bad:
        raise ConfigError(
            f"{bad[0]} is not allowed by backend {backend_cls.name!r} "
            f"(native: {', '.join(map(str, backend_cls.native_bits))}; "
            f"stored: {', '.join(map(str, backend_cls.stored_bits))})",
            source=space.source,  # the space file, and the study whose overrides asked for these bits
            field="bits",
        )
    space.granularity_by_kind = dict(getattr(backend_cls, "weight_granularity", {}))
    try:
        sampler = make_sampler(cfg.sampler.name, cfg.sampler_seed, cfg.sampler.options)
    except ConfigError as exc:
        raise exc.at(src, "sampler.name") from None
    try:
        backend = backend_cls(
            device=cfg.backend.device,
            batch_size=cfg.backend.batch_size,
            threads=cfg.backend.threads,
            **cfg.backend.options,
        )
    except TypeError as exc:
        raise ConfigError(f"bad backend option: {exc}", source=src, field="backend.options") from None
    except AutoCompressError as exc:
        raise ConfigError(str(exc), source=src, field="backend.device") from None
    try:
        make_pruner(cfg.pruner)
    except ConfigError as exc:
        raise exc.at(src) from None
    try:
        _check_storage_url(cfg)
        check_output(cfg)
        check_storage(cfg)
        try:
            if task is not None:
                task = validate_task(task, "task")
            elif cfg.task.name is None:
                raise ConfigError("task.name is required (or pass a Task to run_study)", field="task.name")
            else:
                task = load_task(cfg.task.name, cfg.task.options, where="task")
        except ConfigError as exc:
            raise exc.at(src) from None
        if cfg.pruner.name != "none" and (
            task.train_split.tensors is None or task.metric_obj.needs_reference
        ):
            raise ConfigError(
                "multi-fidelity pruning holds out part of a training split of (inputs, labels) tensors and "
                "scores it without teacher outputs; this task has neither: use pruner.name: none",
                source=src,
                field="pruner.name",
            )
        check_budgets(cfg, task, space, backend)
    except BaseException:
        backend.close()
        raise
    return Prepared(cfg, task, space, backend, sampler)


def _check_storage_url(cfg: StudyConfig) -> None:
    try:
        check_storage_url(cfg.storage_url())
    except ConfigError as exc:
        raise exc.at(cfg.source, "storage") from None


class Progress:
    """One line per trial: n/N, the trial's metrics, the front, elapsed time and ETA."""

    def __init__(self, n_target: int, done: int, log: Callable[[str], None]):
        self.n_target, self.start_done, self.log = n_target, done, log
        self.t0 = time.perf_counter()
        self.cache: LatencyCache | None = None  # set by the loop: its hit count is shown

    def trial(
        self,
        study: optuna.Study,
        done: int,
        number: int,
        m: dict | None,
        reason: str = "",
        pruned: bool = False,
    ) -> None:
        elapsed = time.perf_counter() - self.t0
        ran = done - self.start_done
        eta = elapsed / ran * (self.n_target - done) if ran else math.nan
        if m is None:
            what = f"PRUNED: {reason}" if pruned else f"FAILED: {reason}"
        else:
            what = (
                f"{m.get('metric_name', 'metric')} {m['metric']:.4f} | {m['latency_ms']:.4f} ms ({m.get('speedup', 1):.2f}x) | "
                f"{m['size_bytes'] / 1024:.1f} kB ({m.get('size_ratio', 1):.1f}x smaller)"
            )
            if m.get("latency_cached"):
                hits = f", {self.cache.hits} hits" if self.cache is not None else ""
                what += f" [latency from cache{hits}]"
        front = study.best_trials
        best = ""
        if front:
            fastest = min(front, key=lambda t: t.values[1])
            best = (
                f" | front {len(front)} | fastest feasible {fastest.user_attrs.get('speedup', 1):.2f}x "
                f"@ acc {fastest.values[0]:.4f}"
            )
        eta_s = _fmt_s(eta) if eta == eta else "?"
        self.log(
            f"[{done}/{self.n_target}] trial {number}: {what}{best} | elapsed {_fmt_s(elapsed)}, ETA {eta_s}"
        )


def _recover_interrupted(study: optuna.Study, storage, log, run_dir: Path | None = None) -> None:
    """Trials left RUNNING by a dead process: mark failed with the reason, enqueue their plan again
    (and remove what the dead process may have left of their folders)."""
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        storage.set_trial_user_attr(t._trial_id, "fail_reason", "interrupted: the process running it died")
        storage.set_trial_user_attr(t._trial_id, "fail_category", "interrupted")
        storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        if t.params:
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number}, skip_if_exists=False)
        if run_dir is not None:
            for name in (f".{t.number:05d}.tmp", f"{t.number:05d}"):
                shutil.rmtree(run_dir / "trials" / name, ignore_errors=True)
        log(f"trial {t.number} was interrupted; marked failed and queued again")


@contextlib.contextmanager
def frozen_heap():
    """Keep what is alive once the run is set up (libraries, data, teacher, baseline) out of the
    garbage collector's scans while trials run.

    Every trial ends with a full collection, so that the cycles of its model, optimizer and session
    are freed before the next one (memory stays flat over hours). Without the freeze, that collection
    walks the whole heap of torch, pandas and matplotlib each time (about 0.1 s per trial for the
    set-up heap alone: ``python benchmarks/bookkeeping.py``); frozen, it walks only what the trials
    created.
    """
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@contextlib.contextmanager
def open_run(
    cfg: StudyConfig, log: Callable[[str], None] = print, *, exclusive: bool = True, task: Task | None = None
):
    """Validate, then prepare the run folder (teacher, baseline, study, warm starts) and yield the
    :class:`RunContext` and the Optuna study. Nothing is written if validation fails.

    ``exclusive`` holds the run-folder lock (one local runner per folder); workers that share a
    storage on purpose pass ``False``.
    """
    prep = prepare(cfg, task)
    run_dir = cfg.output_dir()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        prep.backend.close()
        raise ConfigError(
            f"cannot create run folder {str(run_dir)!r}: {exc.strerror}", source=cfg.source, field="output"
        ) from None
    lock = FileLock(str(run_dir / "run.lock"))
    if exclusive:
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise ConfigError(
                f"another process is running this study in {run_dir}", source=cfg.source, field="output"
            ) from None
    try:
        torch.set_num_threads(cfg.finetune.threads)
        # workers starting together: the first one trains the teacher, measures the baseline and creates
        # the study; the others wait here, then load them
        with FileLock(str(run_dir / "setup.lock")):
            if Path(cfg.source).exists():
                write_text_atomic(run_dir / "study.yaml", Path(cfg.source).read_text())
            try:
                teacher = teacher_for_run(prep.task, cfg, run_dir, log)
            except ConfigError as exc:
                raise exc.at(cfg.source) from None
            inventory = build_inventory(teacher, prep.task.example_inputs())
            ctx = RunContext(cfg, run_dir, prep.task, teacher, inventory, prep.space, prep.backend)
            where = cache_path(cfg.backend.latency_cache, run_dir)
            ctx.latency_cache = LatencyCache(where) if where is not None else None
            ctx.baseline = _baseline(ctx, log)
            study = _study(ctx, prep.sampler, log, shared=not exclusive)
            estimate_trial_s(ctx, log)
        if exclusive:  # no other runner writes here: what is half written is debris of a killed run
            clean_run_dir(run_dir, study, log)
            if cfg.trials.keep == "pareto":
                prune_dominated(study, run_dir, log)
        with frozen_heap():
            yield ctx, study
    finally:
        prep.backend.close()
        if exclusive:
            lock.release()


def _baseline(ctx: RunContext, log: Callable[[str], None]) -> dict:
    base_file = ctx.run_dir / "baseline" / "metrics.json"
    if base_file.exists():
        b = json.loads(base_file.read_text())
    else:
        log("measuring the baseline (uncompressed teacher through the same backend)")
        try:
            b = measure_baseline(ctx)
        except AutoCompressError as exc:
            raise ConfigError(
                f"the baseline (uncompressed model) failed: {exc}", source=ctx.config.source, field="task"
            ) from exc
    log(
        f"baseline: {b.get('metric_name', 'metric')} {b['metric']:.4f} | {b['latency_ms']:.4f} ms | {b['size_bytes'] / 1024:.1f} kB"
    )
    return b


def _study(ctx: RunContext, sampler, log: Callable[[str], None], shared: bool = False) -> optuna.Study:
    """Create or load the study; on creation store the run's facts and enqueue the warm starts.

    ``shared``: other workers run trials of this study right now, so RUNNING trials are not ours to
    recover; Optuna's heartbeat finds the dead ones instead (see :mod:`.storage`).
    """
    cfg, b = ctx.config, ctx.baseline
    w = cfg.workers
    beat = (
        {"heartbeat_interval_s": w.heartbeat_interval_s, "grace_period_s": w.grace_period_s} if shared else {}
    )
    storage = make_storage(cfg.storage_url(), max_retry=w.max_retry, retry_s=w.storage_retry_s, **beat)
    study = optuna.create_study(
        study_name=cfg.name,
        storage=storage,
        directions=directions_for(ctx.task),
        sampler=sampler,
        load_if_exists=True,
    )
    existing = study.get_trials(deepcopy=False)
    if "narrowed_domains" in study.user_attrs:  # Optuna needs the domains a study was created with
        ctx.space.narrow(study.user_attrs["narrowed_domains"])
    if existing:  # a resumed run: a sampler seeded as before would propose the same plans again
        study.sampler = make_sampler(
            cfg.sampler.name, resume_seed(cfg.sampler_seed, len(existing)), cfg.sampler.options
        )
    else:
        with warnings.catch_warnings():  # experimental in Optuna, stable enough for labels
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(list(OBJECTIVES))
        study.set_user_attr("config", cfg.model_dump(mode="json"))
        study.set_user_attr(
            "baseline", {k: b[k] for k in ("metric", "latency_ms", "size_bytes", "metric_name")}
        )
        study.set_user_attr("inventory", [i.to_dict() for i in ctx.inventory])
        study.set_user_attr("environment", environment(ctx.backend))
        _applicability(ctx, study, log)
        sensitivity = None
        if cfg.trials.sensitivity_start is not None or cfg.trials.sensitivity_narrow is not None:
            from ..sensitivity import analyze

            sensitivity = analyze(ctx, log=log)
        if cfg.trials.sensitivity_narrow is not None and "sensitivity_narrow" not in study.user_attrs:
            _narrow(ctx, study, sensitivity, cfg.trials.sensitivity_narrow, log)
        for ws in cfg.trials.warm_start:
            params = ctx.space.params_for(
                ctx.inventory,
                bits=ws.bits,
                sparsity=ws.sparsity,
                rank_ratio=ws.rank_ratio,
                sparsity_kind=ws.sparsity_kind,
            )
            params.update(
                ctx.space.plan_params(
                    schedule_kind=ws.schedule, kd_temperature=ws.kd_temperature, kd_alpha=ws.kd_alpha
                )
            )
            study.enqueue_trial(params, user_attrs={"warm_start": ws.model_dump_json()})
        if cfg.trials.sensitivity_start is not None:
            from ..sensitivity import gentle_plan

            gentle = gentle_plan(sensitivity, cfg.trials.sensitivity_start)
            study.enqueue_trial(
                ctx.space.params_from_layers(ctx.inventory, gentle),
                user_attrs={"warm_start": f"sensitivity <= {cfg.trials.sensitivity_start}"},
            )
    if not shared:
        _recover_interrupted(study, storage, log, ctx.run_dir)
    return study


def _applicability(ctx: RunContext, study: optuna.Study, log: Callable[[str], None]) -> None:
    """Check every (technique, layer) pair of the space on the teacher, remove what cannot work from
    the domains (kept in the study's user attrs, like every narrowing), state the coverage; both also
    go to the run folder (``applicability.json``, ``coverage.json``)."""
    from .applicability import Applicability, check_applicability, summary_lines
    from .coverage import coverage, coverage_lines

    if "applicability" in study.user_attrs:  # another worker made the study: the same verdicts
        result = Applicability.from_dict(study.user_attrs["applicability"])
        for line in summary_lines(result) + coverage_lines(study.user_attrs["coverage"]):
            log(line)
        return
    result = check_applicability(
        ctx.task, ctx.teacher, ctx.inventory, ctx.space, ctx.backend, seed=ctx.config.seed, log=log
    )
    narrowed = {**study.user_attrs.get("narrowed_domains", {}), **result.domains}
    ctx.space.narrow(narrowed)
    cov = coverage(ctx.teacher, ctx.task, ctx.inventory, ctx.space, result)
    for line in coverage_lines(cov):
        log(line)
    write_json(ctx.run_dir / "applicability.json", result.to_dict())
    write_json(ctx.run_dir / "coverage.json", cov)
    study.set_user_attr("narrowed_domains", narrowed)
    study.set_user_attr("applicability", result.to_dict())
    study.set_user_attr("coverage", cov)


def _narrow(ctx: RunContext, study: optuna.Study, sensitivity, max_drop: float, log) -> None:
    """Narrow the space's per-layer domains by the sensitivity table; the study keeps them (resumes
    and workers read them back from its user attrs)."""
    from ..sensitivity import narrow_domains, narrowing_summary

    narrowed = narrow_domains(ctx.space, ctx.inventory, sensitivity, max_drop)
    log(narrowing_summary(ctx.space, ctx.inventory, narrowed, max_drop))
    narrowed = {**study.user_attrs.get("narrowed_domains", {}), **narrowed}  # within the applicable ones
    ctx.space.narrow(narrowed)
    study.set_user_attr("narrowed_domains", narrowed)
    study.set_user_attr("sensitivity_narrow", max_drop)


def suggest_plan(ctx: RunContext, trial: optuna.Trial) -> Plan:
    """The trial's plan (every parameter suggested), also stored in the trial's user attrs."""
    cfg = ctx.config
    plan = ctx.space.suggest(
        trial,
        ctx.inventory,
        epochs=cfg.finetune.epochs,
        steps=cfg.finetune.steps,
        lr=cfg.finetune.lr,
        seed=cfg.seed,
    )
    trial.set_user_attr("plan", plan.to_dict())
    # what a rebuild needs besides the plan: seed, threads, library versions, device
    trial.set_user_attr("seed", cfg.seed)
    trial.set_user_attr("finetune_threads", cfg.finetune.threads)
    backend = getattr(ctx, "backend", None)  # the Ray searcher passes a namespace without one
    if backend is not None:
        trial.set_user_attr("environment", environment(backend))
    return plan


def resume_seed(seed: int, n_trials: int) -> int:
    """The sampler seed for a run resumed with ``n_trials`` already in the storage.

    Deterministic (the same resume gives the same plans) and different from the first run's seed
    (Optuna's seeded samplers would otherwise repeat the plans of the first trials).
    """
    if n_trials == 0:
        return seed
    return int(np.random.SeedSequence([seed, n_trials]).generate_state(1)[0])


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
    "latency_cached",
    "environment",
    "size_bytes",
    "speedup",
    "size_ratio",
    "metric_drop",
    "packed_size_bytes_theoretical",
    "kernels",
    "notes",
    "seconds",
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
    from ..export import export_front
    from ..report import write_report

    n_target = n_trials or cfg.trials.n
    with open_run(cfg, log, task=task) as (ctx, study):
        stopped = _loop(ctx, study, n_target, stop_after, log)
        score_front_fully(ctx, study, log)
        export_front(study, ctx.run_dir)
        write_report(study, ctx.run_dir)
        completed = _complete_count(study)
        log(
            f"{completed}/{n_target} trials completed; results in {ctx.run_dir}/ (trials.csv, pareto.png, pareto/)"
        )
        return RunSummary(study, completed, n_target, stopped)


def make_fidelity(ctx: RunContext, study: optuna.Study) -> Fidelity | None:
    """The study's multi-fidelity pruning (None when ``pruner.name`` is ``none``)."""
    if ctx.config.pruner.name == "none":
        return None
    return Fidelity(ctx.config, study._storage, ctx.task)


def execute_trial(
    ctx: RunContext, study: optuna.Study, trial: optuna.Trial, fidelity: Fidelity | None = None
) -> tuple[TrialState, dict | None, str]:
    """Run one asked trial end to end and tell the study: (state, metrics or None, reason).

    A failing trial is recorded with its reason; a pruned one (``fidelity``) keeps its last held-out
    accuracy; neither stops the caller.
    """
    run_ctx = dataclasses.replace(ctx, task=fidelity.task) if fidelity else ctx
    try:
        plan = suggest_plan(ctx, trial)
        hook = fidelity.on_epoch(trial) if fidelity else None
        metrics = run_trial(run_ctx, plan, ctx.run_dir / "trials" / f"{trial.number:05d}", on_epoch=hook)
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
            study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number}, skip_if_exists=False)
            raise
        return TrialState.FAIL, None, reason
    study.tell(trial, record_success(ctx, trial, metrics))
    crash_point("told", trial=trial.number)
    if fidelity:
        fidelity.finish(trial, TrialState.COMPLETE)
    return TrialState.COMPLETE, metrics, ""


def _complete_count(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


def _loop(ctx: RunContext, study: optuna.Study, n_target: int, stop_after: int | None, log) -> str:
    cfg = ctx.config
    done = _complete_count(study)
    if done >= n_target:
        log(f"study already has {done} completed trials (asked for {n_target}): nothing to run")
        return "done"
    progress = Progress(n_target, done, log)
    progress.cache = ctx.latency_cache
    deadline = time.monotonic() + cfg.trials.timeout_s if cfg.trials.timeout_s else math.inf
    failures = ran = 0
    fidelity = make_fidelity(ctx, study)
    while done < n_target:
        if time.monotonic() > deadline:
            log(f"wall-time budget of {cfg.trials.timeout_s} s reached after {done} trials")
            return "timeout"
        if stop_after is not None and ran >= stop_after:
            return "stop_after"
        trial = study.ask()
        ran += 1
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
        if cfg.trials.keep == "pareto":
            prune_dominated(study, ctx.run_dir, log)
        done += 1
        progress.trial(study, done, trial.number, metrics)
        try:
            write_trials_table(study, ctx.run_dir)
        except OSError as exc:  # a full disk must not end a long run; the final report retries
            log(f"warning: could not update trials.csv: {exc}")
    return "done"
