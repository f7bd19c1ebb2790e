"""The run's shared context: what every trial of a run reads (config, task, teacher, space, backend,
baseline), how a model is lowered and scored for the run, and the run's baseline measurement.

Built once by the runner (:mod:`autocompress.search.run_setup`); :mod:`autocompress.objective` runs one
trial against it.
"""

from __future__ import annotations

import copy
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .backends import Artifact, Backend, LatencyCache, timed_or_cached
from .backends.device_facts import environment
from .config import StudyConfig
from .errors import AutoCompressError, ConfigError
from .holdout import HeldOut, split_training
from .inventory import LayerInfo
from .lowering import LoweringSpec
from .metrics import Metric
from .rundir import BASELINE, METRICS, finalize_dir, read_baseline, write_json
from .space import SearchSpace
from .tasks import Task
from .tasks.data import deployable
from .units import fmt_bytes


@dataclass
class RunContext:
    """What every trial of a run shares (built once by the runner)."""

    config: StudyConfig
    run_dir: Path
    task: Task
    teacher: nn.Module
    inventory: list[LayerInfo]
    space: SearchSpace
    backend: Backend
    baseline: dict | None = None
    latency_cache: LatencyCache | None = None
    references: dict = field(default_factory=dict)  # eval limit -> the teacher's outputs per batch
    trial_estimate: dict | None = None  # the per-trial wall-time estimate (search.costs.estimate_trial_s)
    trials_left: int | None = None  # trials still to run, this one included (the runner's loop; None: unknown)
    held: dict = field(default_factory=dict, repr=False)  # id(task) -> (task, its HeldOut): held_out()

    @property
    def metric(self) -> Metric:
        return self.task.metric_obj

    def held_out(self) -> HeldOut:
        """The training split cut into the part trials fine-tune on and the held-out part (computed
        once): held out when early stopping or ``finetune.keep_better`` reads it and trials
        fine-tune; else nothing is held out (``HeldOut.split`` None)."""
        task, cfg = self.task, self.config
        cached = self.held.get(id(task))
        if cached is None or cached[0] is not task:
            wanted = cfg.early_stopping.name != "none" or (cfg.finetune.keep_better and cfg.finetune.trains())
            held = (
                split_training(task, cfg.finetune.holdout_fraction, cfg.seed)
                if wanted
                else HeldOut(task, None, "nothing reads a held-out part")
            )
            cached = self.held[id(task)] = (task, held)
        return cached[1]

    def eval_limit(self, full: bool = False) -> int | None:
        """Samples each evaluation reads: ``trials.eval_samples`` during the search, all when ``full``."""
        return None if full else self.config.trials.eval_samples

    def reference(self, limit: int | None) -> list[np.ndarray] | None:
        """The teacher's outputs on the eval batches (only for metrics that compare to the teacher)."""
        if not self.metric.needs_reference:
            return None
        if limit not in self.references:
            ts = deployable(self.teacher, self.task.io)
            with torch.no_grad():
                self.references[limit] = [
                    ts(*inputs).float().numpy() for inputs, _ in self.task.eval_split.batches(limit)
                ]
        return self.references[limit]

    def score(self, artifact: Artifact, full: bool = False) -> float:
        """The task's metric of ``artifact``, streamed over the eval split (a subset unless ``full``)."""
        limit = self.eval_limit(full)
        return self.backend.evaluate(
            artifact, self.task.eval_split.batches(limit), self.metric, self.reference(limit)
        )

    def baseline_artifact(self) -> Artifact | None:
        """The run's baseline artifact (None before it is measured)."""
        base = self.baseline
        if not base:
            return None
        path = self.run_dir / BASELINE / base.get("artifact", "model.onnx")
        return Artifact(path, self.backend.name, self.backend.device, base["size_bytes"], base["size_bytes"])

    def lower(self, model: nn.Module, out_dir: Path, spec: LoweringSpec | None = None) -> Artifact:
        """``model`` (the task's calling convention) lowered by the run's backend as ``spec`` says."""
        task = self.task
        spec = LoweringSpec.coerce(spec)
        return self.backend.lower(
            deployable(model, task.io),
            task.example_inputs(),
            spec,
            out_dir,
            calibration=task.calibration_inputs() if spec else None,
            io=task.io,
        )


def build_baseline(ctx: RunContext) -> dict:
    """The uncompressed teacher, BN folded, lowered by the same backend: accuracy, latency, size."""
    from .techniques import fold_batchnorm

    out = ctx.run_dir / BASELINE
    tmp = ctx.run_dir / f".{BASELINE}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.perf_counter()
    model, _ = fold_batchnorm(copy.deepcopy(ctx.teacher))
    artifact = ctx.lower(model, tmp)
    tr = time.perf_counter()
    # the teacher's outputs (fidelity's reference), computed once per run: not part of any evaluation
    ctx.reference(ctx.eval_limit())
    if ctx.eval_limit() is not None:
        ctx.reference(None)
    t1 = time.perf_counter()
    acc = ctx.score(artifact)
    t2 = time.perf_counter()
    full = ctx.score(artifact, full=True) if ctx.eval_limit() is not None else acc
    t3 = time.perf_counter()
    lat, _, cached = timed_or_cached(
        ctx.backend, ctx.latency_cache, artifact, None, ctx.task.example_inputs()
    )
    seconds = {
        "lower": tr - t0,
        "teacher_evaluate": t1 - tr,
        "evaluate": t2 - t1,
        "evaluate_full": t3 - t2,
        "measure": time.perf_counter() - t3,
    }
    metrics = {
        "artifact": artifact.path.name,
        "latency_cached": cached,
        "metric": acc,
        "metric_full": full,
        "metric_name": ctx.metric.name,
        "metric_sign": ctx.metric.sign,
        "eval_samples": ctx.eval_limit(),
        "latency_ms": lat.median_ms,
        "latency_p90_ms": lat.p90_ms,
        "latency": lat.to_dict(),
        "size_bytes": artifact.size_bytes,
        "kernels": artifact.meta.get("kernels", {}),
        "environment": environment(ctx.backend),
        "seconds": seconds,
    }
    write_json(tmp / METRICS, metrics)
    finalize_dir(tmp, out)
    return metrics


def baseline_for_run(ctx: RunContext, log: Callable[[str], None]) -> dict:
    """The run's baseline: read from ``baseline/metrics.json``, or built and measured the first time.

    Raises:
        ConfigError: the uncompressed model could not be lowered, scored or timed.
    """
    b = read_baseline(ctx.run_dir)
    if b is None:
        log("measuring the baseline (uncompressed teacher through the same backend)")
        try:
            b = build_baseline(ctx)
        except AutoCompressError as exc:
            raise ConfigError(
                f"the baseline (uncompressed model) failed: {exc}", source=ctx.config.source, field="task"
            ) from exc
    log(
        f"baseline: {b.get('metric_name', 'metric')} {b['metric']:.4f} | {b['latency_ms']:.4f} ms | {fmt_bytes(b['size_bytes'])}"
    )
    return b
