"""One trial end to end: plan -> compressed model -> artifact -> accuracy + latency + size."""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import gc
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .backends import Artifact, timed_or_cached
from .backends.device_facts import environment
from .context import RunContext  # noqa: F401 - re-exported: the trial's context
from .deadline import check_deadline, finetune_time, run_remaining, trial_scope
from .errors import RunFolderUnwritable, TrialFailed, unwritable_errno
from .faults import arm_export_hooks, crash_point, fault
from .finetune_policy import FINETUNE_SLACK, recoverable, rolling_steps, skip_reason
from .holdout import holdout_scores
from .pareto import metric_drop, relative_drop
from .pipeline import Compressed, compress, finetune_steps
from .plan import Plan
from .rundir import finalize_dir, trial_tmp_dir, write_json, write_text_atomic


def state_for_saving(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with every tensor contiguous and none sharing memory (safetensors refuses
    shared tensors, e.g. tied embeddings): a tensor seen before is stored as a copy."""
    seen: set[int] = set()
    out = {}
    for k, v in model.state_dict().items():
        v = v.detach().contiguous()
        ptr = v.data_ptr()
        out[k] = v.clone() if ptr in seen and v.numel() else v
        seen.add(ptr)
    return out


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim  # glibc only
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _malloc_trim()


def release_memory() -> None:
    """After a trial: collect the cycles of its model, optimizer and session, and hand the freed
    heap back to the system (glibc keeps it otherwise, so resident memory would creep with the mix
    of layer sizes the trials allocate)."""
    gc.collect()
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def run_trial(
    ctx: RunContext,
    plan: Plan,
    trial_dir: Path,
    on_epoch: Callable[[int, float, nn.Module], None] | None = None,
) -> dict:
    """Compress, lower, evaluate and time one plan; write its folder atomically; return metrics.

    The trial runs under ``trials.trial_timeout_s`` (see :mod:`autocompress.deadline`); its number is
    the folder name (``trials/00012``). ``on_epoch`` is passed to :func:`~autocompress.pipeline.compress` (early stopping).

    Raises:
        TrialFailed / BackendError / TechniqueError: the trial cannot produce valid metrics.
        TrialTimeout: it ran past ``trials.trial_timeout_s``.
    """
    number = int(trial_dir.name) if trial_dir.name.isdigit() else None
    with trial_scope(number, ctx.config.trials.trial_timeout_s):
        try:
            return _run_trial(ctx, plan, trial_dir, on_epoch)
        except RunFolderUnwritable:
            raise
        except Exception as exc:  # a full disk / read-only folder, however the writer wrapped it
            code = unwritable_errno(exc)
            if code is None:
                raise
            raise RunFolderUnwritable(
                f"cannot write the trial folder in {trial_dir.parent}: [{errno.errorcode[code]}] "
                f"{os.strerror(code)}; free space (or make it writable), then run the same command to resume"
            ) from exc


def _against_baseline(ctx: RunContext, value: float, lat, base_lat, size_bytes: int) -> dict:
    """A trial's figures relative to the baseline artifact timed beside it.

    The latency objective is the measured ratio to the baseline (timed side by side, so immune to the
    machine's drift between trials) in milliseconds of the run's reference baseline latency.
    """
    base = ctx.baseline
    drop = metric_drop(value, base["metric"], ctx.metric.sign)
    return {
        "latency_measured_ms": lat.median_ms,
        "latency_ms": base["latency_ms"] * lat.median_ms / base_lat.median_ms,
        "latency_p90_ms": base["latency_ms"] * lat.p90_ms / base_lat.median_ms,
        "baseline_metric": base["metric"],
        "metric_drop": drop,
        "metric_drop_rel": relative_drop(drop, base["metric"]),
        "baseline_latency_ms": base_lat.median_ms,
        "baseline_latency": base_lat.to_dict(),
        "baseline_size_bytes": base["size_bytes"],
        "speedup": base_lat.median_ms / lat.median_ms,
        "size_ratio": base["size_bytes"] / size_bytes,
    }


def _trial_metrics(
    ctx: RunContext, acc: float, lat, base_lat, cached: bool, artifact: Artifact, result
) -> dict:
    """What a trial records: the metric, latency, size and what the pipeline and backend did."""
    metrics = {
        "metric": acc,
        "metric_name": ctx.metric.name,
        "latency_ms": lat.median_ms,
        "latency_p90_ms": lat.p90_ms,
        "latency": lat.to_dict(),
        "latency_cached": cached,
        "size_bytes": artifact.size_bytes,
        "packed_size_bytes_theoretical": artifact.packed_size_bytes,
        # shared / sparse weights: how each was stored, and the file entropy-coded (labelled: not the size)
        "compact_weights": artifact.meta.get("compact_weights", {}),
        "entropy_coded_bytes_lzma": artifact.meta.get("entropy_coded_bytes_lzma"),
        "layer_bits": artifact.layer_bits,
        "sparsity": result.sparsity,
        "kernels": artifact.meta.get("kernels", {}),
        "measured_on": artifact.meta.get("measured", {}),  # e.g. ascend: .om on the NPU or fake-quant
        "notes": result.notes,
        "finetune_losses": result.losses,
        "artifact": artifact.path.name,
        "environment": environment(ctx.backend),
    }
    if ctx.baseline:
        metrics.update(_against_baseline(ctx, acc, lat, base_lat, artifact.size_bytes))
    return metrics


def _finetuned_wins(finetuned: float, post_training: float, sign: int) -> bool:
    """Whether the fine-tuned model is kept: at least as good as the post-training one in the metric's
    direction (a tie keeps the fine-tuned model); a NaN score (non-finite outputs) loses to any number."""
    if post_training != post_training:
        return True
    return finetuned == finetuned and sign * finetuned >= sign * post_training


def _teacher_holdout(ctx: RunContext) -> float:
    """The teacher's metric on the held-out part (computed once per run)."""
    held = ctx.held_out()
    key = ("teacher_holdout", id(held.split))
    if key not in ctx.held:
        ctx.held[key] = holdout_scores([ctx.teacher], held.task, held.split, ctx.teacher)[0]
    return ctx.held[key]


def build_model(
    ctx: RunContext, plan: Plan, on_epoch: Callable[[int, float, nn.Module], None] | None = None
) -> tuple[Compressed, dict, dict[str, float]]:
    """The trial's compressed model: ``compress`` on the part of the training split trials fine-tune on.

    With ``finetune.keep_better`` (and a plan that fine-tunes, and a held-out part), the post-training
    model (the same plan with no optimizer steps: quantization calibrated, pruning and low rank applied)
    is built too, both are scored on the held-out part with the task's metric (one pass), and the better
    one is kept (the fine-tuned one on a tie). Returns (the kept result, what the trial records of the
    choice: ``kept``, ``holdout_post_training``, ``holdout_finetuned``; seconds spent on it).
    """
    cfg, backend = ctx.config, ctx.backend
    held = ctx.held_out()
    task = held.task
    args = {
        "reduce_range": backend.reduce_range,
        "threads": cfg.finetune.threads,
        "batch_size": cfg.finetune.batch_size,
        "round_to": backend.preferred_channel_multiple,
    }
    compare = (
        cfg.finetune.keep_better
        and held.split is not None
        and finetune_steps(task, plan, cfg.finetune.batch_size) > 0
    )
    if not compare:
        return compress(task, ctx.teacher, plan, on_epoch=on_epoch, **args), {}, {}
    t0 = time.perf_counter()
    post = compress(task, ctx.teacher, dataclasses.replace(plan, steps=0), **args)
    t1 = time.perf_counter()
    if cfg.finetune.when == "missed_budget":  # post-training first: fine-tune only where it pays
        (pt,) = holdout_scores([post.model], task, held.split, ctx.teacher)
        why = skip_reason(
            pt,
            _teacher_holdout(ctx),
            ctx.metric.sign,
            cfg.budgets,
            recoverable(ctx.teacher, post.model, plan),
            ctx.metric.name,
        )
        seconds = {"post_training": t1 - t0, "holdout": time.perf_counter() - t1}
        if why is not None:
            return (
                post,
                {"kept": "post_training", "holdout_post_training": pt, "finetune_skipped": why},
                seconds,
            )
        plan, steps, limit_s = _rolling(ctx, plan, task, seconds["holdout"])
        if steps == 0:
            why = "no fine-tune time is left in the run's wall-time budget (trials.timeout_s)"
            return (
                post,
                {"kept": "post_training", "holdout_post_training": pt, "finetune_skipped": why},
                seconds,
            )
        with finetune_time(limit_s):
            tuned = compress(task, ctx.teacher, plan, on_epoch=on_epoch, **args)
        t3 = time.perf_counter()
        (ft,) = holdout_scores([tuned.model], task, held.split, ctx.teacher)
        seconds["holdout"] += time.perf_counter() - t3
    else:
        tuned = compress(task, ctx.teacher, plan, on_epoch=on_epoch, **args)
        t3 = time.perf_counter()
        pt, ft = holdout_scores([post.model, tuned.model], task, held.split, ctx.teacher)
        seconds = {"post_training": t1 - t0, "holdout": time.perf_counter() - t3}
    steps = finetune_steps(task, plan, cfg.finetune.batch_size)
    record = {"holdout_post_training": pt, "holdout_finetuned": ft, "finetune_steps": steps}
    if tuned.steps_done < steps:  # the fine-tune's time ran out first
        record["finetune_steps_done"] = tuned.steps_done
    if _finetuned_wins(ft, pt, ctx.metric.sign):
        return tuned, {"kept": "finetuned", **record}, seconds
    post.losses, post.train_s = tuned.losses, tuned.train_s  # what the fine-tune did, though not kept
    return post, {"kept": "post_training", **record}, seconds


def _rolling(ctx: RunContext, plan: Plan, task, holdout_s: float = 0.0) -> tuple[Plan, int, float | None]:
    """The plan with this trial's share of the fine-tune time the run has left
    (:func:`~autocompress.finetune_policy.rolling_steps`), its steps, and the seconds its fine-tune may
    take (None: no run-wide budget). ``holdout_s``: what scoring one model on the held-out part took
    (the fine-tuned model is scored too, in each trial's share)."""
    cfg, est = ctx.config, ctx.trial_estimate or {}
    planned = finetune_steps(task, plan, cfg.finetune.batch_size)
    remaining = run_remaining()
    if not est.get("step_s") or remaining is None or not ctx.trials_left:
        return plan, planned, None  # no run-wide budget (or a worker of a shared study): as planned
    other = est["total"] - est["finetune"] + holdout_s
    base = max(planned, round(est["finetune"] / est["step_s"]))  # the length before any time cap
    steps = rolling_steps(base, remaining, ctx.trials_left, other, est["step_s"], cfg.trials.trial_timeout_s)
    # the estimate timed float steps: a step that costs more (quantization-aware, distilled features)
    # ends the fine-tune at its share of the time instead of overrunning the trials after it
    limit_s = steps * est["step_s"] * FINETUNE_SLACK
    return (plan if steps == planned else dataclasses.replace(plan, steps=steps)), steps, limit_s


def _run_trial(ctx: RunContext, plan: Plan, trial_dir: Path, on_epoch=None) -> dict:
    t0 = time.perf_counter()
    cfg, backend = ctx.config, ctx.backend
    tmp = trial_tmp_dir(trial_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if fault("raise"):
            raise RuntimeError("injected fault: the trial raised")
        result, kept, built_s = build_model(ctx, plan, on_epoch)
        t1 = time.perf_counter()
        arm_export_hooks(result.model)
        artifact = ctx.lower(result.model, tmp, result.lowering)
        check_deadline("lowering")
        if fault("ort_load"):  # a corrupted artifact file: the runtime must refuse to load it
            artifact.path.write_bytes(b"\x00 not an ONNX model \xff" * 8)
        t2 = time.perf_counter()
        acc = ctx.score(artifact)
        check_deadline("evaluation")
        t3 = time.perf_counter()
        crash_point("measure", after_s=0.1)  # dies while the artifact is being timed
        # timed side by side with the baseline artifact (the speedup is a measured ratio), or taken from
        # the latency cache when this structure was timed before
        lat, base_lat, cached = timed_or_cached(
            backend, ctx.latency_cache, artifact, ctx.baseline_artifact(), ctx.task.example_inputs()
        )
        t4 = time.perf_counter()
        check_deadline("latency measurement")
        if not all(map(lambda v: v == v and abs(v) != float("inf"), (acc, lat.median_ms))):
            raise TrialFailed(f"non-finite metrics: {ctx.metric.name}={acc}, latency={lat.median_ms}")
        save_file(state_for_saving(result.model), str(tmp / "weights.safetensors"))
        crash_point("artifact_write")
        if fault("disk_full"):  # the disk fills up while the folder is written
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp / "plan.json"))
        write_text_atomic(tmp / "plan.json", plan.to_json())
        metrics = _trial_metrics(ctx, acc, lat, base_lat, cached, artifact, result)
        metrics.update(kept)
        metrics["seconds"] = {
            "finetune": t1 - t0,  # build_model(): technique set-up + the training loop (+ keep_better)
            "train": result.train_s,  # the training loop alone
            **built_s,  # keep_better: the post-training model's compress() and both held-out scores
            "lower": t2 - t1,
            "evaluate": t3 - t2,
            "measure": t4 - t3,
            "total": time.perf_counter() - t0,
        }
        metrics["disk_bytes"] = sum(f.stat().st_size for f in tmp.iterdir() if f.is_file())
        write_json(tmp / "metrics.json", metrics)
        finalize_dir(tmp, trial_dir)
        crash_point("renamed")
        metrics["artifact"] = str(trial_dir / artifact.path.name)
        return metrics
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        release_memory()
        torch.set_num_threads(cfg.finetune.threads)
