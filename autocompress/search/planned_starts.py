"""Planned starts in a study: measure the profiles, plan (:mod:`.planner`), merge plans of the same
structure, enqueue them as the first trials, and compare each planned trial's prediction with what it
measured."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import optuna

from ..context import RunContext
from ..finetune_policy import recoverable
from ..pipeline import compress
from ..plan import LayerPlan, Plan
from .latency_profile import measure_profile
from .one_shot import POST_TRAINING, one_shot_plans
from .one_shot_mixed import mixed_plan
from .planner import Planned, layer_values, merge_same_structure, plan_candidates, structure_key

COMPARED = ("metric_drop", "speedup", "size_ratio")


def allowed_drop(ctx: RunContext) -> float | None:
    """The study's metric budget in the metric's own units (the absolute or the relative one, the tighter)."""
    b = ctx.config.budgets
    drops = [b.max_metric_drop] if b.max_metric_drop is not None else []
    if b.max_metric_drop_rel is not None:
        drops.append(b.max_metric_drop_rel * abs(ctx.baseline["metric"]))
    return min(drops) if drops else None


def plan_structure(ctx: RunContext, planned: Planned) -> str:
    """The plan's structure key (:func:`.planner.structure_key`), plus whether it is fine-tuned where a
    fine-tuned trial of it could end with other weights than a post-training one (:func:`tuning_differs`)."""
    layers = {k: LayerPlan(**v) for k, v in layer_values(planned, ctx.inventory).items()}
    plan = Plan(layers=layers, epochs=0, seed=ctx.config.seed)
    out = compress(
        ctx.task,
        ctx.teacher,
        plan,
        reduce_range=ctx.backend.reduce_range,
        round_to=ctx.backend.preferred_channel_multiple,
    )
    key = structure_key(out)
    return key + (f"|{planned.post_training}" if tuning_differs(ctx, plan, out.model) else "")


def tuning_differs(ctx: RunContext, plan: Plan, post_model) -> bool:
    """Whether a fine-tuned trial of ``plan`` can differ from its post-training trial: the study trains,
    and unless it fine-tunes only plans that miss the budget and remove weights (``finetune.when:
    missed_budget`` with ``keep_better`` and a held-out part, which first score the post-training model)
    the plan removes some (:func:`~autocompress.finetune_policy.recoverable`). Otherwise the fine-tuned
    trial keeps its post-training model and repeats the post-training trial."""
    ft = ctx.config.finetune
    if not ft.trains():
        return False
    if ft.when != "missed_budget" or not ft.keep_better or ctx.held_out().split is None:
        return True
    return recoverable(ctx.teacher, post_model, plan)


def make_plans(
    ctx: RunContext, profile: dict, n: int, measured: Sequence[Planned] = (), mixed_scale: float = 1.0
) -> list[Planned]:
    """At most ``n`` plans of different structure: the peers' one-call answers first
    (:func:`.one_shot.one_shot_plans`, post-training), the int8 plan with its most sensitive layers kept
    float (:func:`.one_shot_mixed.mixed_plan`, post-training), then the profile's
    (:func:`.planner.plan_candidates`).

    ``measured``: the plans the study's first trials ran before the profile (:mod:`.first_trials`): a plan
    of the same structure as one of them is not planned again (listed in its ``merged``).

    A one-shot plan and a fine-tuned plan of the same structure are two experiments (other weights) and
    both stay only where the fine-tuned trial can end with other weights (:func:`tuning_differs`): a
    hands-off study does not fine-tune a plan that only quantizes, so its fine-tuned twin would repeat
    the post-training trial."""
    drop = allowed_drop(ctx)
    first = one_shot_plans(ctx.space, ctx.inventory, profile)
    mixed = mixed_plan(ctx.space, ctx.inventory, profile, drop, mixed_scale)
    first += [mixed] if mixed is not None else []
    plans = merge_same_structure(
        [*measured, *first, *plan_candidates(profile, ctx.space, drop)], lambda p: plan_structure(ctx, p)
    )
    ran = {id(p) for p in measured}
    return [p for p in plans if p.layers and id(p) not in ran][:n]


# a plan that removes channels reaches its widths gradually over the first half of fine-tuning
# (Zhu & Gupta's cubic schedule; measured on mnist1d_cnn, 60% of the channels removed everywhere,
# 4 epochs, lr 0.003: 0.983 accuracy where pruning once before fine-tuning kept 0.955); a plan that removes none
# quantizes from the first step
GRADUAL = {"schedule_kind": "cubic", "schedule_start": 0.0, "schedule_end": 0.5}
AT_ONCE = {"schedule_kind": "one_shot", "schedule_start": 0.0}


def plan_schedule(planned: Planned) -> dict:
    """The sparsity schedule a planned start asks for (the space may fix it otherwise)."""
    removes = any(f.get("sparsity", 0.0) > 0 for f in planned.layers.values())
    return GRADUAL if removes else AT_ONCE


def enqueue_planned(
    ctx: RunContext,
    study: optuna.Study,
    n: int,
    log: Callable[[str], None],
    trial_s: float | None,
    measured: Sequence[Planned] = (),
    given: dict | None = None,
    earlier: dict | None = None,
    mixed_scale: float = 1.0,
) -> list[Planned]:
    """Profile the teacher, plan, and enqueue up to ``n`` planned trials (user attr ``planned``).

    ``measured``: the plans the study's first trials ran (not planned again); ``given``: profile rows
    those trials measured, ``earlier``: the profile's first pass (:func:`~.latency_profile.measure_profile`'s
    ``given`` and ``earlier``); ``mixed_scale``: :func:`.one_shot_mixed.mixed_plan`'s ``scale``."""
    profile = measure_profile(ctx, log, trial_s=trial_s, given=given, earlier=earlier)
    plans = make_plans(ctx, profile, n, measured, mixed_scale)
    study.set_user_attr("latency_profile", {k: v for k, v in profile.items() if k != "rows"})
    for p in plans:
        params = ctx.space.params_from_layers(ctx.inventory, layer_values(p, ctx.inventory))
        params.update(ctx.space.plan_params(**plan_schedule(p), kd_temperature=4.0, kd_alpha=0.5))
        record = {**p.predicted, "name": p.name, "choices": p.choices, "merged": p.merged}
        attrs = {"warm_start": f"planned: {p.name}", "planned": record}
        if p.post_training:  # the trial compresses without fine-tuning (runner.suggest_plan reads it)
            attrs[POST_TRAINING] = True
        study.enqueue_trial(params, user_attrs=attrs)
        merged = f" (merged: {'; '.join(p.merged)})" if p.merged else ""
        unprofiled = (
            " (its structure not profiled: the base's figures)" if p.predicted.get("unprofiled") else ""
        )
        when = "post-training" if p.post_training else "before fine-tuning"
        log(
            f"planned start '{p.name}'{merged}{unprofiled}: predicted {p.predicted['speedup']:.2f}x faster, "
            f"{p.predicted['size_ratio']:.2f}x smaller, drop {p.predicted['metric_drop']:+.4f} ({when}): "
            f"{', '.join(p.choices)}"
        )
    if not plans and not measured:
        log("planned starts: the profile shows no change that fits the budget; the sampler starts alone")
    elif not plans:
        log("planned starts: the profile plans nothing the first trials have not measured")
    return plans


def prediction_errors(user_attrs: dict) -> dict[str, float] | None:
    """A completed planned trial's measured minus predicted ``metric_drop``, ``speedup``, ``size_ratio``."""
    planned = user_attrs.get("planned")
    if not planned or "speedup" not in user_attrs or any(k not in planned for k in COMPARED):
        return None  # not planned, not measured, or planned without a prediction (the first trials)
    return {k: float(user_attrs[k]) - float(planned[k]) for k in COMPARED}


def prediction_line(number: int, user_attrs: dict) -> str | None:
    """One line after a planned trial: predicted vs measured."""
    err = prediction_errors(user_attrs)
    if err is None:
        return None
    p = user_attrs["planned"]
    return (
        f"planned trial {number} ('{p['name']}'): speedup {p['speedup']:.2f}x predicted, "
        f"{user_attrs['speedup']:.2f}x measured; size {p['size_ratio']:.2f}x / {user_attrs['size_ratio']:.2f}x; "
        f"drop {p['metric_drop']:+.4f} predicted (no fine-tune) / {user_attrs['metric_drop']:+.4f} measured"
    )
