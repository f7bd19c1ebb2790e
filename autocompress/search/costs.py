"""What a run costs and the front's final scores: the per-trial estimate printed before the search,
the latency profile's cost line, and the whole-eval-set scores of the front's models when the search
compared them on a subset."""

from __future__ import annotations

import time
from collections.abc import Callable

import optuna

from ..context import RunContext
from ..pareto import metric_drop
from ..plan import Plan


def _fmt_s(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def score_front_fully(ctx: RunContext, study: optuna.Study, log: Callable[[str], None]) -> None:
    """With ``trials.eval_samples``, score each front model's artifact on the whole eval set too.

    The search compared trials on the subset; the whole-set figures go into the study's user attr
    ``metric_full`` (trial number -> ``{"metric": ..., "metric_drop": ...}``: a finished trial's own
    attrs cannot change) and from there into ``pareto/front.json`` and the report.
    """
    if ctx.eval_limit() is None:
        return
    base_full = ctx.baseline.get("metric_full", ctx.baseline["metric"])
    done = dict(study.user_attrs.get("metric_full", {}))
    for t in study.best_trials:
        if str(t.number) in done or "artifact" not in t.user_attrs or "repeat_of" in t.user_attrs:
            continue
        path = ctx.run_dir / t.user_attrs["artifact"]
        if not path.exists():
            continue
        full = ctx.score(ctx.backend.load_artifact(path), full=True)
        drop = metric_drop(full, base_full, ctx.metric.sign)
        done[str(t.number)] = {"metric": full, "metric_drop": drop}
        log(f"front trial {t.number}: {ctx.metric.name} {full:.4f} on the whole eval set (drop {drop:+.4f})")
    study.set_user_attr("metric_full", done)


def estimate_trial_s(ctx: RunContext, log: Callable[[str], None]) -> dict[str, float]:
    """A per-trial wall-time estimate printed before the search: the fine-tune's steps timed on two
    batches (teacher forward + student forward/backward), the evaluation, and the baseline's
    lowering and timing."""
    from ..pipeline import finetune_steps
    from ..tasks.data import deployable

    cfg, task = ctx.config, ctx.task
    plan = Plan(epochs=cfg.finetune.epochs, steps=cfg.finetune.steps)
    steps = finetune_steps(task, plan, cfg.finetune.batch_size)
    ts = deployable(ctx.teacher, task.io)
    batches = list(
        task.train_split.batches(limit=2 * cfg.finetune.batch_size, batch_size=cfg.finetune.batch_size)
    )
    t0 = time.perf_counter()
    for inputs, _ in batches:
        out = ts(*inputs)
        out.float().pow(2).mean().backward()
    ctx.teacher.zero_grad(set_to_none=True)
    step_s = (time.perf_counter() - t0) / max(1, len(batches)) * 1.3  # + the teacher's KD forward
    base_s = ctx.baseline.get("seconds", {})
    est = {
        "finetune": steps * step_s,
        "evaluate": base_s.get("evaluate", 0.0),
        "lower": base_s.get("lower", 0.0),
        "measure": base_s.get("measure", 0.0),
    }
    est["total"] = sum(est.values())
    est["step_s"] = step_s
    log(
        f"estimated per trial: {_fmt_s(est['total'])} (fine-tune {steps} steps x {step_s:.3f} s = "
        f"{est['finetune']:.1f} s, lowering {est['lower']:.1f} s, evaluation {est['evaluate']:.1f} s, "
        f"timing {est['measure']:.1f} s); {cfg.trials.n} trials ~ {_fmt_s(est['total'] * cfg.trials.n)}"
    )
    return est


def profile_line(p: dict) -> str:
    """One line: what the profile measured and what it cost."""
    te = p.get("trial_equivalents")
    cost = f"{p['seconds']:.1f} s" + (f" = {te:.2f} trial-equivalents" if te is not None else "")
    ok = [r for r in p["rows"] if r.get("status") == "ok"]
    shared = (
        f", {p['shared']} taken from the same structural role ({p['roles']} roles)" if p.get("shared") else ""
    )
    trials = f" ({p['from_trials']} measured by the first trials)" if p.get("from_trials") else ""
    best = max(ok, key=lambda r: r["speedup"], default=None)
    fastest = (
        f"; fastest single change: {best['layer']} {best['setting']} {best['speedup']:.2f}x" if best else ""
    )
    return (
        f"latency profile: {len(p['rows'])} (layer, setting) rows in {cost} ({p['lowerings']} lowerings, "
        f"{p['timed']} structures timed, {p['cache_hits']} from the latency cache, {p['reused']} rows reused{trials}, "
        f"{p['skipped']} over budget{shared}){fastest}"
    )
