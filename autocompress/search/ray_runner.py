"""``autocompress run STUDY --ray ADDRESS``: the same study as Ray Tune trials on a Ray cluster.

* Ray Tune runs the trials; :class:`BudgetedOptunaSearch` (Tune's ``OptunaSearch``) asks and tells the
  *same* Optuna study, in the same storage, with the same multi-objective sampler as a local run, so
  ``report`` and ``pick`` work unchanged. ``OptunaSearch`` passes only objective values to ``study.tell``;
  the subclass first stores what :func:`~autocompress.search.runner.record_success` stores locally (user
  attrs: plan, metrics, artifact path; and the budget constraints that the samplers read), fail reasons
  and, for trials stopped early, their last held-out accuracy (state PRUNED).
* The trainable runs :func:`~autocompress.objective.run_trial` on the worker; the run folder must be
  visible at the same path on every node (a shared filesystem): the worker loads the teacher and the
  baseline from it and writes the trial's folder into it.
* Resources per trial come from the study's ``ray:`` section (CPUs, GPUs, custom resources like NPU,
  concurrency). A trial whose worker or node dies is retried by Tune (``FailureConfig.max_failures``).
* Multi-fidelity: the trainable reports the held-out accuracy after every epoch, and Tune's ASHA or
  HyperBand scheduler (the counterparts of Optuna's SuccessiveHalving / Hyperband pruners) stops the
  hopeless trials.
* Resume: the searcher's state *is* the Optuna study (TPE, GP, random and NSGA-II derive every decision
  from the stored trials), so a driver that died is resumed by running the same command again: the
  driver re-opens the run folder, marks the trials the dead driver left RUNNING as failed and queues
  their plans again (as a local run does), and a fresh Tuner with a fresh ``OptunaSearch`` over the same
  study runs only the missing trials. ``Tuner.restore`` would replay Tune's own experiment snapshot,
  which here holds nothing the study does not, and would pickle the searcher with its storage.
* Latency timing needs no Ray actor: every worker on a node times inside the machine-wide per-device
  file lock (:func:`~autocompress.backends.device_lock`, an ``flock`` in the node's temp dir). Ray's
  workers on a node are ordinary processes of that machine, so the lock serializes every trial of every
  worker (and of any other autocompress process) that times on that device of that node, and a worker
  killed while timing releases it with its process. Nodes are separate machines with separate devices,
  so their timings need not wait for each other.
"""

from __future__ import annotations

import json
import math
import os
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import optuna
from optuna.trial import TrialState

from ..config import StudyConfig
from ..errors import ConfigError, MissingDependencyError
from ..optuna_compat import storage_of
from ..pareto import OBJECTIVES, objectives_for
from ..rundir import RAY, TEACHER_META, baseline_metrics_file, trial_dir
from .first_trials import complete_setup, setup_pending
from .preflight import trial_target
from .progress import Progress
from .run_setup import open_run
from .runner import RECORDED, RunSummary, complete_count, finish_run, record_success, suggest_plan

try:
    import ray
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch
except ImportError:  # pragma: no cover - the [ray] extra is not installed
    ray = tune = None
    OptunaSearch = object

RESULT_KEY = "autocompress_metrics"
FAILED_KEY = "autocompress_failed"
VAL_KEY = "val_accuracy"


class _SpaceFn:
    """Define-by-run space for OptunaSearch: suggests the plan exactly as a local trial does."""

    def __init__(self, config: StudyConfig, space, inventory):
        self.ns = SimpleNamespace(config=config, space=space, inventory=inventory)

    def __call__(self, trial) -> dict:
        plan = suggest_plan(self.ns, trial)
        return {"plan": plan.to_dict(), "trial_number": trial.number}


class BudgetedOptunaSearch(OptunaSearch):
    """Tune's OptunaSearch that records each trial as a local run does before telling the study.

    The state of the search lives in the Optuna storage, so :meth:`save` / :meth:`restore` keep nothing
    (see the module docstring: resuming rebuilds from the storage).
    """

    def __init__(self, *args, config: StudyConfig, run_dir: Path, progress: Progress | None = None, **kw):
        super().__init__(*args, **kw)
        self._record_ns = SimpleNamespace(config=config, run_dir=run_dir)
        self._progress = progress
        self.completed = self.failed = self.pruned = 0

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        ot_trial = self._ot_trials[trial_id]
        result = result or {}
        metrics = None
        if RESULT_KEY in result:
            metrics = json.loads(result[RESULT_KEY])
            values = record_success(self._record_ns, ot_trial, metrics)
            self._ot_study.tell(ot_trial, values)
            state, reason = TrialState.COMPLETE, ""
            self.completed += 1
        elif FAILED_KEY in result or error:
            failed = json.loads(result[FAILED_KEY]) if FAILED_KEY in result else {}
            reason = failed.get("reason") or "the Ray trial failed after its retries (worker or node died?)"
            ot_trial.set_user_attr("fail_reason", reason)
            if failed.get("traceback"):
                ot_trial.set_user_attr("traceback", failed["traceback"])
            self._ot_study.tell(ot_trial, state=TrialState.FAIL)
            state = TrialState.FAIL
            self.failed += 1
        else:  # stopped early by the scheduler: keep the last held-out accuracy
            if VAL_KEY in result:
                ot_trial.set_user_attr(VAL_KEY, float(result[VAL_KEY]))
                ot_trial.set_user_attr("epochs_done", int(result.get("epoch", 0)))
            reason = (
                f"stopped early by the scheduler at held-out accuracy {result.get(VAL_KEY, math.nan):.4f}"
            )
            ot_trial.set_user_attr("prune_reason", reason)
            self._ot_study.tell(ot_trial, state=TrialState.PRUNED)
            state = TrialState.PRUNED
            self.pruned += 1
        self._completed_trials.add(trial_id)
        if self._progress is not None:
            done = len(self._ot_study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
            self._progress.trial(
                self._ot_study, done, ot_trial.number, metrics, reason, pruned=state == TrialState.PRUNED
            )

    def save(self, checkpoint_path: str) -> None:
        Path(checkpoint_path).write_text(json.dumps({"state": "in the Optuna storage"}))

    def restore(self, checkpoint_path: str) -> None:
        pass


_WORKER_CTX: dict[str, object] = {}


def _worker_context(cfg: StudyConfig):
    """The RunContext on a Ray worker: teacher and baseline loaded from the (shared) run folder."""
    from .run_setup import context_from_folder, prepare

    key = str(cfg.output_dir().resolve())
    if key in _WORKER_CTX:
        return _WORKER_CTX[key]
    run_dir = cfg.output_dir()
    if not (baseline_metrics_file(run_dir).exists() and (run_dir / TEACHER_META).exists()):
        raise ConfigError(
            f"run folder {run_dir.resolve()} is not visible on this node ({os.uname().nodename}): "
            "put the study's output on a filesystem every Ray node mounts at the same path",
            source=cfg.source,
            field="output",
        )
    prep = prepare(cfg)
    ctx = context_from_folder(cfg, run_dir, prep.task, prep.space, prep.backend)
    _WORKER_CTX[key] = ctx
    return ctx


def _trainable(config: dict, study: dict, source: str, cwd: str) -> None:
    """One Ray Tune trial: the same objective as a local trial; metrics go back in the final report."""
    import torch

    from ..objective import run_trial
    from ..plan import Plan
    from .multifidelity import holdout_accuracy

    os.chdir(cwd)  # relative paths in the study file mean what they meant to the driver
    cfg = StudyConfig.model_validate(study)
    cfg.source = source
    torch.set_num_threads(cfg.finetune.threads)
    number = int(config["trial_number"])
    last: dict = {}  # the scheduler's metric goes into every report of a trial that reports per epoch
    try:
        ctx = _worker_context(cfg)
        hook = None
        if cfg.early_stopping.name != "none":
            held = ctx.held_out()  # the run's held-out part; run_trial fine-tunes on the rest
            last[VAL_KEY] = 0.0

            def hook(epoch: int, loss: float, model) -> None:
                last.update({VAL_KEY: holdout_accuracy(model, held.task, held.split), "epoch": epoch + 1})
                tune.report(dict(last))

        metrics = run_trial(ctx, Plan.from_dict(config["plan"]), trial_dir(ctx.run_dir, number), hook)
    except Exception as exc:  # a bad plan is recorded as failed, not retried (retries are for dead workers)
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:500]
        failed = {"reason": reason, "traceback": traceback.format_exc()[-4000:]}
        tune.report({**last, FAILED_KEY: json.dumps(failed)})
        return
    keep = {k: metrics[k] for k in (*RECORDED, "artifact") if k in metrics}
    tune.report({**last, **{k: metrics[k] for k in OBJECTIVES}, RESULT_KEY: json.dumps(keep, default=float)})


def _scheduler(cfg: StudyConfig):
    """Tune's counterpart of the study's early stopping (Optuna pruner), on the held-out accuracy per epoch."""
    if cfg.early_stopping.name == "none":
        return None
    opts = cfg.early_stopping.options
    common = {
        "metric": VAL_KEY,
        "mode": "max",
        "time_attr": "training_iteration",
        "max_t": cfg.finetune.epochs + 1,
    }
    rf = opts.get("reduction_factor", 3)
    if cfg.early_stopping.name == "successive_halving":
        grace = opts.get("min_resource", 1)
        grace = 1 if grace == "auto" else int(grace)
        return tune.schedulers.ASHAScheduler(grace_period=grace, reduction_factor=rf, **common)
    return tune.schedulers.HyperBandScheduler(reduction_factor=rf, **common)


def _resources(cfg: StudyConfig):
    r = cfg.ray
    bundle = {"CPU": r.cpus_per_trial, "GPU": r.gpus_per_trial, **r.resources}
    return tune.PlacementGroupFactory([{k: v for k, v in bundle.items() if v}])


def run_study_ray(
    cfg: StudyConfig, address: str, *, n_trials: int | None = None, log: Callable[[str], None] = print
) -> RunSummary:
    """Run (or resume) ``cfg`` on the Ray cluster at ``address`` (``auto``: the cluster of this host).

    Raises:
        MissingDependencyError: ray[tune] is not installed.
    """
    if ray is None:
        raise MissingDependencyError('--ray needs Ray Tune: pip install "autocompress[ray]"')
    n_target = trial_target(cfg, n_trials)
    if cfg.early_stopping.name != "none":
        # per-epoch reports carry only the scheduler's metric; the searcher reads the objectives from the
        # final report (multi-objective OptunaSearch ignores intermediate results), so Tune's check that
        # every result holds the searcher's metrics does not apply (its documented switch)
        os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    with open_run(cfg, log) as (ctx, study):
        # the first trials stay first in the queue; Tune runs them in parallel with the sampler's, so the
        # driver sets the rest up before (both parts of the second stage, one after the other)
        while setup_pending(study):
            complete_setup(ctx, study, log)
        run_dir = ctx.run_dir.resolve()
        # "local": a Ray instance started for this run only (no cluster)
        ray.init(
            address=None if address == "local" else address, logging_level="WARNING", log_to_driver=False
        )
        try:
            stopped = _rounds(cfg, ctx, study, n_target, run_dir, log)
        finally:
            ray.shutdown()
        return finish_run(ctx, study, n_target, stopped, log)


def _rounds(cfg: StudyConfig, ctx, study: optuna.Study, n_target: int, run_dir: Path, log) -> str:
    """Tune runs of the missing trials until the study has ``n_target`` (failed trials leave gaps)."""
    done = complete_count(study)
    if done >= n_target:
        log(f"study already has {done} completed trials (asked for {n_target}): nothing to run")
        return "done"
    progress = Progress(n_target, done, log)
    deadline = time.monotonic() + cfg.trials.timeout_s if cfg.trials.timeout_s else math.inf
    failures = 0
    study_data = cfg.model_dump(mode="python")
    trainable = tune.with_resources(
        tune.with_parameters(_trainable, study=study_data, source=cfg.source, cwd=os.getcwd()),
        _resources(cfg),
    )
    while done < n_target:
        left_s = deadline - time.monotonic()
        if left_s <= 0:
            log(f"wall-time budget of {cfg.trials.timeout_s} s reached after {done} trials")
            return "timeout"
        searcher = BudgetedOptunaSearch(
            space=_SpaceFn(cfg, ctx.space, ctx.inventory),
            metric=list(OBJECTIVES),
            mode=["max" if s > 0 else "min" for s in objectives_for(ctx.metric.sign).values()],
            sampler=study.sampler,
            study_name=study.study_name,
            storage=storage_of(study),
            config=cfg,
            run_dir=ctx.run_dir,
            progress=progress,
        )
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=searcher,
                scheduler=_scheduler(cfg),
                num_samples=n_target - done,
                max_concurrent_trials=cfg.ray.max_concurrent,
                time_budget_s=None if math.isinf(left_s) else left_s,
                reuse_actors=True,  # one process per slot keeps the loaded task, teacher and backend
            ),
            run_config=tune.RunConfig(
                name=f"tune-{time.strftime('%Y%m%d-%H%M%S')}",
                storage_path=str(run_dir / RAY),
                failure_config=tune.FailureConfig(max_failures=cfg.ray.max_failures),
                verbose=0,
            ),
        )
        tuner.fit()
        failures += searcher.failed
        done = complete_count(study)
        if failures > cfg.trials.max_failures:
            log(f"stopping: {failures} failed trials (trials.max_failures = {cfg.trials.max_failures})")
            return "failures"
    return "done"
