"""A study's set-up in two stages, so that its first trials come within minutes of the start.

1. **With the study** (:func:`enqueue_first`, called by :mod:`.run_setup` right after the baseline):
   the peers' one-call answers (:func:`.one_shot.one_shot_plans`: int8 everywhere static, and dynamic
   where the model is Linear-heavy), post-training, enqueued as the study's first trials. No
   applicability check and no profile come before them.
2. **After them** (:func:`finish_setup`, called by the runner, a worker or the Ray driver once no first
   trial is waiting): the applicability check narrows the domains, the sensitivity analysis, the warm
   starts, and the latency profile with the rest of the planned starts (the mixed int8 plan, the
   profile's candidates; a structure the first trials measured is not planned again, and their
   whole-model rows are not profiled again). Where the mixed int8 plan can be made, the profile first
   measures only the rows it needs and enqueues it as one more first trial (stage ``profile``); once
   it ran, the rest of the profile plans the rest. Then the sampler.

The study's user attr :data:`SETUP_STAGE` says which stage it is in (``early`` until the second stage
ran, ``profile`` between its two parts, then ``done``; a study without it was made in one stage), so a
run killed anywhere resumes where it stopped, and the first worker that finds the stage due runs it
(under the run folder's set-up lock) while the others wait for it and then narrow their own space from
the study.

Why the first trials carry their plan (user attr :data:`FIXED_PLAN`) instead of Optuna parameters: the
applicability check narrows categorical domains after them, and Optuna refuses a parameter another
choice set once a trial of the study holds it (``CategoricalDistribution does not support dynamic value
space``). Holding no parameter, they leave every domain free to be narrowed; the sampler learns nothing
from them (its first trials are random anyway), and a plan the sampler proposes again is found by
:mod:`.repeats` from the plans, not the parameters.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import optuna
from filelock import FileLock
from optuna.trial import TrialState

from ..context import RunContext
from ..deadline import trials_during_setup
from ..rundir import SETUP_LOCK
from .one_shot import POST_TRAINING, PROFILE_LABELS, one_shot_plans
from .planner import Planned, layer_values

SETUP_STAGE = (
    "setup_stage"  # study user attr: EARLY, PROFILE while the second stage's second part is due, DONE
)
EARLY, PROFILE, DONE = "early", "profile", "done"
EARLY_PROFILE = "early_profile"  # study user attr: the summary of the profile's first pass (the 8-bit rows)
SECOND_STAGE = "setup_second_stage"  # study user attr: when the second stage began (epoch s), its seconds
FIXED_PLAN = "fixed_plan"  # trial user attr: the plan to run as it is (no Optuna parameters)
AT_ONCE = {"schedule_kind": "one_shot", "schedule_start": 0.0}
# what a first trial measured that the profile's whole-model row holds
ROW_FIELDS = ("metric", "metric_drop", "size_bytes", "size_ratio", "speedup", "latency_ms")


def enqueue_first(ctx: RunContext, study: optuna.Study, n: int, log: Callable[[str], None]) -> list[Planned]:
    """Enqueue up to ``n`` one-shot int8 plans as the study's first trials (see the module doc)."""
    plans = one_shot_plans(ctx.space, ctx.inventory)[:n]
    for p in plans:
        _enqueue_fixed(ctx, study, p, {"merged": []})
        log(
            f"planned start '{p.name}' (post-training), a first trial before the applicability check and "
            f"the profile: {', '.join(p.choices)}"
        )
    return plans


def _enqueue_fixed(ctx: RunContext, study: optuna.Study, p: Planned, record: dict) -> None:
    """Enqueue ``p`` as a first trial: its plan fixed, post-training (``record``: more of the trial's
    ``planned`` user attr)."""
    cfg = ctx.config
    params = ctx.space.params_from_layers(ctx.inventory, layer_values(p, ctx.inventory))
    params.update(ctx.space.plan_params(**AT_ONCE, kd_temperature=4.0, kd_alpha=0.5))
    plan = ctx.space.plan_from_params(
        ctx.inventory, params, epochs=cfg.finetune.epochs, steps=0, lr=cfg.finetune.lr, seed=cfg.seed
    )
    attrs = {
        "warm_start": f"planned: {p.name}",
        "planned": {**record, "name": p.name, "choices": p.choices, "first": True},
        POST_TRAINING: True,
        FIXED_PLAN: plan.to_dict(),
    }
    study.enqueue_trial({}, user_attrs=attrs)


def setup_pending(study: optuna.Study) -> bool:
    """Whether the study's second set-up stage (or its second part) has yet to run."""
    return study.user_attrs.get(SETUP_STAGE) in (EARLY, PROFILE)


def first_waiting(study: optuna.Study) -> bool:
    """Whether a first trial (or the retry of one) is waiting to run."""
    return any(
        FIXED_PLAN in t.user_attrs for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    )


def setup_due(study: optuna.Study) -> bool:
    """Whether the second stage is to run now: pending, and no first trial left waiting."""
    return setup_pending(study) and not first_waiting(study)


def _first_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The first trials (not their retries), in order."""
    return [
        t
        for t in study.get_trials(deepcopy=False)
        if FIXED_PLAN in t.user_attrs and "retry_of" not in t.user_attrs
    ]


def measured_plans(study: optuna.Study) -> list[Planned]:
    """The first trials' plans as :class:`~.planner.Planned` (their structures are not planned again)."""
    return [
        Planned(
            t.user_attrs["planned"]["name"], dict(t.user_attrs[FIXED_PLAN]["layers"]), {}, post_training=True
        )
        for t in _first_trials(study)
    ]


def _int8_layers(layers: dict[str, dict]) -> dict[str, tuple]:
    """The layers a plan quantizes, with how (what decides a whole-model int8 row)."""
    return {
        k: (int(v.get("bits", 32)), str(v.get("quant_mode", "static")))
        for k, v in layers.items()
        if int(v.get("bits", 32)) < 32
    }


def given_rows(ctx: RunContext, study: optuna.Study) -> dict[tuple[str, str], dict]:
    """The profile's whole-model int8 rows that a completed first trial measured (the same layers in the
    same mode): ``{("*", label): row}``."""
    from .latency_profile import uniform_settings

    settings = dict(uniform_settings(ctx.space, ctx.inventory))
    wanted = {label: _int8_layers(layers) for label, layers in settings.items()}
    out: dict[tuple[str, str], dict] = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if FIXED_PLAN not in t.user_attrs or "speedup" not in t.user_attrs:
            continue
        label = PROFILE_LABELS.get(t.user_attrs["planned"]["name"])
        if label is None or wanted.get(label) != _int8_layers(t.user_attrs[FIXED_PLAN]["layers"]):
            continue
        row = {k: t.user_attrs[k] for k in ROW_FIELDS if k in t.user_attrs}
        out[("*", label)] = {
            "layer": "*",
            "setting": label,
            # what the planner builds on this base: a plan on an empty base was float under its label
            "values": settings[label],
            "status": "ok",
            **row,
            "timed": f"trial {t.number}",
        }
    return out


def finish_setup(ctx: RunContext, study: optuna.Study, log: Callable[[str], None]) -> None:
    """The second stage (the module doc): narrow, analyse, enqueue the warm and planned starts.

    Where it plans, it runs in two parts: the first (stage :data:`EARLY`) narrows, enqueues the warm
    starts, profiles only what the mixed int8 plan needs (each unit's ``8-bit`` row) and enqueues that
    plan as one more first trial (stage :data:`PROFILE`); the second (stage :data:`PROFILE`, once that
    trial ran) completes the profile and plans the rest. The mixed plan is the usual answer to "int8
    everywhere lost too much": on MobileNetV2 it came 2.8 minutes later when it waited for the whole
    profile (its 16 rows: 5.3 min)."""
    cfg, t0 = ctx.config, time.time()
    if "narrowed_domains" in study.user_attrs:  # a stage killed after narrowing: resumed as narrowed
        ctx.space.narrow(study.user_attrs["narrowed_domains"])
    _, planned = cfg.trials.starts()
    trial_s = (ctx.trial_estimate or {}).get("total")
    if study.user_attrs.get(SETUP_STAGE) != PROFILE:
        _narrow_and_warm_starts(ctx, study, log)
        measured = measured_plans(study)
        if planned > len(measured):
            with trials_during_setup(first_trials_seconds(study)):
                early = _enqueue_mixed(ctx, study, log, trial_s, measured)
            if early is not None:
                study.set_user_attr(EARLY_PROFILE, early)
                study.set_user_attr(SECOND_STAGE, {"start": t0, "seconds": time.time() - t0})
                study.set_user_attr(SETUP_STAGE, PROFILE)
                return
    measured = measured_plans(study)
    if planned > len(measured):
        from .planned_starts import allowed_drop, enqueue_planned

        with trials_during_setup(first_trials_seconds(study)):  # the profile's share of the budget
            enqueue_planned(
                ctx,
                study,
                planned - len(measured),
                log,
                trial_s,
                measured,
                given_rows(ctx, study),
                earlier=study.user_attrs.get(EARLY_PROFILE),
                mixed_scale=mixed_scale(study, allowed_drop(ctx)),
            )
    before = study.user_attrs.get(SECOND_STAGE) or {}
    study.set_user_attr(
        SECOND_STAGE,
        {"start": before.get("start", t0), "seconds": before.get("seconds", 0.0) + time.time() - t0},
    )
    study.set_user_attr(SETUP_STAGE, DONE)


def mixed_scale(study: optuna.Study, allowed: float | None) -> float:
    """Measured over predicted metric drop of the mixed int8 first trial when it missed the budget
    ``allowed`` (:func:`.one_shot_mixed.mixed_plan`'s ``scale``; 1: none ran, or it kept within the
    budget, or it measured less than predicted)."""
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        planned, ua = t.user_attrs.get("planned") or {}, t.user_attrs
        if FIXED_PLAN not in ua or "metric_drop" not in planned or "metric_drop" not in ua:
            continue
        measured, predicted = float(ua["metric_drop"]), float(planned["metric_drop"])
        if allowed is not None and measured > allowed and predicted > 0 and measured > predicted:
            return measured / predicted
    return 1.0


def _narrow_and_warm_starts(ctx: RunContext, study: optuna.Study, log: Callable[[str], None]) -> None:
    """The applicability check's (and the sensitivity analysis's) narrowing, and the warm starts."""
    from .study_narrowing import narrow_by_applicability, narrow_by_sensitivity

    cfg = ctx.config
    narrow_by_applicability(ctx, study, log)
    sensitivity = None
    if cfg.trials.sensitivity_start is not None or cfg.trials.sensitivity_narrow is not None:
        from ..inspection import analyze

        sensitivity = analyze(ctx, log=log)
    if cfg.trials.sensitivity_narrow is not None and "sensitivity_narrow" not in study.user_attrs:
        narrow_by_sensitivity(ctx, study, sensitivity, cfg.trials.sensitivity_narrow, log)
    warm_starts, _ = cfg.trials.starts()
    for ws in warm_starts:
        params = ctx.space.params_for(ctx.inventory, **ws.layer_values())
        params.update(
            ctx.space.plan_params(
                schedule_kind=ws.schedule, kd_temperature=ws.kd_temperature, kd_alpha=ws.kd_alpha
            )
        )
        study.enqueue_trial(params, user_attrs={"warm_start": ws.model_dump_json()})
    if cfg.trials.sensitivity_start is not None:
        from ..inspection import gentle_plan

        gentle = gentle_plan(sensitivity, cfg.trials.sensitivity_start)
        study.enqueue_trial(
            ctx.space.params_from_layers(ctx.inventory, gentle),
            user_attrs={"warm_start": f"sensitivity <= {cfg.trials.sensitivity_start}"},
        )


def _enqueue_mixed(
    ctx: RunContext, study: optuna.Study, log: Callable[[str], None], trial_s, measured: list[Planned]
) -> dict | None:
    """Profile each unit's ``8-bit`` row only and enqueue the mixed int8 plan
    (:func:`.one_shot_mixed.mixed_plan`) as a first trial; the first pass's profile summary (what the
    full pass adds to), or None when there is no such plan or one of its structure already ran."""
    from .latency_profile import measure_profile
    from .one_shot_mixed import SENSITIVITY, mixed_plan
    from .planned_starts import allowed_drop, plan_structure
    from .planner import merge_same_structure

    said: list[str] = []  # the first pass's lines: shown only where it plans (else the full pass says it all)
    profile = measure_profile(
        ctx, said.append, trial_s=trial_s, given=given_rows(ctx, study), settings={SENSITIVITY}
    )
    summary = {k: v for k, v in profile.items() if k != "rows"}
    summary["rows"] = [{"status": r.get("status")} for r in profile["rows"]]
    mixed = mixed_plan(ctx.space, ctx.inventory, profile, allowed_drop(ctx))
    if mixed is None:
        return None
    kept = merge_same_structure([*measured, mixed], lambda p: plan_structure(ctx, p))
    if mixed not in kept:
        return None  # a first trial ran this structure already
    _enqueue_fixed(ctx, study, mixed, {**mixed.predicted, "merged": []})
    for line in said:
        log(line)
    log(
        f"planned start '{mixed.name}' (post-training), a first trial from the profile's 8-bit rows, before "
        f"the rest of it: predicted {mixed.predicted['speedup']:.2f}x faster, drop "
        f"{mixed.predicted['metric_drop']:+.4f}: {', '.join(mixed.choices)}"
    )
    return summary


def first_trials_seconds(study: optuna.Study) -> float:
    """Wall seconds the study's finished first trials ran (they are trials, not set-up)."""
    return sum(
        (t.datetime_complete - t.datetime_start).total_seconds()
        for t in study.get_trials(
            deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)
        )
        if FIXED_PLAN in t.user_attrs and t.datetime_start and t.datetime_complete
    )


def complete_setup(ctx: RunContext, study: optuna.Study, log: Callable[[str], None]) -> None:
    """Run the second stage once (the first process here, under the run folder's set-up lock), or take
    its narrowed domains from the study when another process ran it."""
    with FileLock(str(ctx.run_dir / SETUP_LOCK)):
        if study.user_attrs.get(SETUP_STAGE) == PROFILE:
            log("the first trials are done: the rest of the profile plans the rest")
        elif setup_pending(study):
            log("the first trials are done: the applicability check and the profile plan the rest")
        if setup_pending(study):
            finish_setup(ctx, study, log)
    sync_domains(ctx, study)


def sync_domains(ctx: RunContext, study: optuna.Study) -> None:
    """This process's space narrowed as the study's second stage narrowed it (a worker that ran a first
    trial while another ran the stage)."""
    narrowed = study.user_attrs.get("narrowed_domains")
    if narrowed is not None and study.user_attrs.get(SETUP_STAGE) != EARLY:  # narrowed by the first part
        ctx.space.narrow(narrowed)
