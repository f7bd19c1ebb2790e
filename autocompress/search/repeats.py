"""A plan that builds a model already measured is not run again.

Samplers propose the same model more than once: TPE proposed one plan four times in a row on a
sentence encoder (47 s each), and most proposals differ only in settings that change nothing (the
schedule of a plan that prunes nothing, the distillation of a plan that does not fine-tune, the
weight grid of a float layer). :func:`plan_key` is a plan's canonical form: every setting that cannot
change the compressed model's weights or structure is put back to its default, so two plans with the
same key build the same model (the same seed, the same data). :func:`find_repeat` looks for a
completed trial of that key before a trial runs.

**What a repeat records, and why.** The repeat is told COMPLETE with the earlier trial's objective
values, metrics and constraints (its user attr ``repeat_of`` names the trial that measured them; its
``seconds`` are its own, the look-up's), the way Optuna's FAQ answers duplicated suggestions:

* the sampler's picture stays true: the plan was evaluated and this is its result. A PRUNED repeat
  would put a measured model, possibly on the front, among the worst trials of TPE's split (pruned
  trials without intermediate values rank below every complete one in a multi-objective study) and
  steer the search away from a good region for no reason; a FAILED one would be invisible to the
  sampler, which could propose it forever.
* the front stays honest: a repeat has the same values as its original, so neither dominates the other;
  the export and the whole-set scoring skip repeats (:func:`is_repeat`), so each model is exported and
  scored once.
* the trial budget counts models measured: a repeat does not count towards ``trials.n`` (the runner),
  and a sampler that proposes nothing new for :data:`MAX_REPEATS_IN_A_ROW` trials in a row ends the
  search.
"""

from __future__ import annotations

import hashlib
import json
import os
import time

import optuna
from optuna.trial import TrialState

from ..plan import FLOAT_BITS, LayerPlan
from ..registry import TECHNIQUES

REPEAT_OF = "repeat_of"
MAX_REPEATS_IN_A_ROW = 50

# plan-wide settings that act only while fine-tuning
_TRAINING = (
    "kd_temperature",
    "kd_alpha",
    "lr",
    "hints",
    "hint_weight",
    "kd_features",
    "kd_feature_weight",
    "lsq",
)
_QUANT_FIELDS = ("quant_scheme", "quant_granularity", "quant_mode")


def _layer(values: dict, kind: str | None) -> dict | None:
    """A layer's fields with the ones that change nothing at their defaults; None when all are."""
    lp = LayerPlan(**{k: v for k, v in values.items() if k in {d.name for d in TECHNIQUES.dims()}})
    if kind is not None:
        lp = lp.for_kind(kind)[0]
    d = lp.to_dict()
    defaults = {x.name: x.default for x in TECHNIQUES.dims()}
    if d.get("bits") == FLOAT_BITS:  # a float layer has no integer grid
        d.update({k: defaults[k] for k in _QUANT_FIELDS if k in d})
    elif d.get("bits") != 8 and "quant_mode" in d:
        d["quant_mode"] = defaults["quant_mode"]
    if d.get("sparsity") == 0 and d.get("sparsity_kind") != "2:4":  # nothing removed, masked or 2:4
        d["sparsity_kind"] = defaults["sparsity_kind"]
    if d.get("rank_ratio") == 1.0:  # not factorized
        d["rank_mode"] = defaults["rank_mode"]
    return None if d == defaults else d


def _fine_tunes(plan: dict) -> bool:
    steps = plan.get("steps")
    return bool(steps) if steps is not None else plan.get("epochs", 0) > 0


def canonical_plan(plan: dict, kinds: dict[str, str] | None = None) -> dict:
    """``plan`` (a :meth:`~autocompress.plan.Plan.to_dict`) with every setting that cannot change the
    compressed model at its default or left out: per layer (``kinds``: layer -> inventory kind), the
    fields that do not apply to its kind, the weight grid of a float layer, the sparsity kind where
    nothing is removed, the rank mode where nothing is factorized, and layers left as they are; plan-wide,
    the fine-tuning settings of a plan that does not fine-tune (then also ``epochs`` / ``steps``: 0),
    the schedule, channel importance and refit of a plan that removes nothing, the calibration of a plan
    without static integer layers."""
    kinds = kinds or {}
    layers = {n: f for n, v in sorted(plan.get("layers", {}).items()) if (f := _layer(v, kinds.get(n)))}
    out = {k: v for k, v in plan.items() if k != "layers"}
    out["layers"] = layers
    if not _fine_tunes(plan):
        for k in (*_TRAINING, "schedule", "epochs", "steps"):
            out.pop(k, None)
    prunes = any(f.get("sparsity", 0) > 0 or f.get("sparsity_kind") == "2:4" for f in layers.values())
    if not prunes:
        for k in ("schedule", "importance", "reconstruct"):
            out.pop(k, None)
    if not any(f.get("bits", FLOAT_BITS) <= 8 and f.get("quant_mode") == "static" for f in layers.values()):
        out.pop("calibration", None)
    if out.get("hint_weight", 1) == 0:
        out.pop("hints", None)
    if out.get("kd_features") == "none":
        out.pop("kd_feature_weight", None)
    return out


def plan_key(plan: dict, kinds: dict[str, str] | None = None) -> str:
    """A digest of :func:`canonical_plan`: equal keys, the same compressed model."""
    blob = json.dumps(canonical_plan(plan, kinds), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def is_repeat(trial: optuna.trial.FrozenTrial) -> bool:
    """Whether the trial copied an earlier trial's results (not a model of its own)."""
    return trial.user_attrs.get(REPEAT_OF) is not None


def find_repeat(
    study: optuna.Study, plan: dict, kinds: dict[str, str] | None = None, number: int | None = None
) -> optuna.trial.FrozenTrial | None:
    """The first completed trial (not itself a repeat) whose plan has ``plan``'s key, if any."""
    key = plan_key(plan, kinds)
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if t.number == number or is_repeat(t) or "plan" not in t.user_attrs or "artifact" not in t.user_attrs:
            continue
        if plan_key(t.user_attrs["plan"], kinds) == key:
            return t
    return None


def repeat_metrics(ctx, original: optuna.trial.FrozenTrial, recorded: tuple[str, ...], t0: float) -> dict:
    """The metrics a repeat of ``original`` records (for ``runner.record_success``): the original's, its
    artifact, ``seconds`` of its own."""
    ua = original.user_attrs
    metrics = {k: ua[k] for k in recorded if k in ua}
    metrics["seconds"] = {"total": time.perf_counter() - t0}
    metrics["artifact"] = os.path.join(ctx.run_dir, ua["artifact"])
    return metrics
