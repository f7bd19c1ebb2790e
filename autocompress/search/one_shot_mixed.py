"""The third one-shot plan: int8 static everywhere except the layers most sensitive to it, kept float.

What a user tries after "int8 everywhere" loses accuracy (or to get the float model's accuracy at most
of int8's speed): the same post-training plan with the few layers whose int8 costs the most metric per
unit of latency it saves left in float. :func:`mixed_plan` plans it from the latency profile
(:mod:`.latency_profile`):

* **Sensitivity** is the profile's ``8-bit`` (static) row of each unit (a layer, or a group of the
  space's ``groups`` changed together): the unit's metric drop when it alone is int8, and the speedup
  that alone gives. The profile measures every unit's 8-bit row before any other setting, so its budget
  covers them first; a unit whose row was not measured is not a candidate (it stays int8), and a row
  copied from its structural role carries the role's drop. One-unit rows are lowered without bias
  correction, so a unit's drop is its raw sensitivity (the trial corrects).
* **Prediction.** int8 drops do not add up (on the ImageNet MobileNetV2 fine-tuned on MNIST the seven
  one-unit rows, uncorrected, summed to 0.0112, twice the bias-corrected whole model's 0.0054), so the
  whole-model ``all 8-bit`` row's drop ``D`` is shared among the measured units in proportion to their
  one-unit drops, and a unit kept float takes its share away. Without that row the one-unit drops are summed. The latency is the
  whole-model row's times each float unit's one-unit speedup (the saving it gives back; none for a unit
  that int8 alone made slower), at most the float model's.
* **Choice.** Units by drop per latency saved (most first) are kept float until the predicted drop
  fits :data:`WELL_INSIDE` of the study's budget, or :data:`NEARLY_LOSSLESS` of it when int8 everywhere
  already fits the budget (then the plan is for the float model's metric at most of int8's speed). The
  float units carry at most :data:`MAX_FLOAT_MACS` of the int8 layers' MACs (past that it is not an int8
  plan any more); a unit that would pass it is skipped.

* **Measured.** Where a mixed plan already ran post-training and measured more drop than predicted
  and more than the budget (the profile scores a subset of the eval split, and one-unit drops under-
  or overstate their sum), the next mixed plan scales every predicted drop by measured / predicted,
  which keeps more units float (``scale``).

No plan when no unit's int8 costs anything measurable (every measured drop <= 0), when no unit can be
kept float within the MACs cap, or when the model has no static int8 layers.
"""

from __future__ import annotations

from .one_shot import STATIC, uniform_layers, whole_row
from .planner import DEFAULT_DROP, Planned

SENSITIVITY = "8-bit"  # the profile's one-unit setting read as int8 sensitivity (static, per channel)
WELL_INSIDE = 0.5  # x the budget: the predicted drop to reach when int8 everywhere misses the budget
NEARLY_LOSSLESS = 0.1  # x the budget: the same when int8 everywhere already fits it
MAX_FLOAT_MACS = 0.35  # the float units' share of the static int8 layers' MACs, at most
_EPS = 1e-3  # a unit whose int8 saves no latency alone still divides by this much


def _sensitivities(profile: dict, static: dict[str, dict]) -> list[dict]:
    """``{"unit", "members", "drop", "gain", "speedup"}`` of each unit measured at 8 bits static whose
    members are all in ``static``."""
    out = []
    for r in profile.get("rows", []):
        if (
            r["layer"] == "*"
            or r["setting"] != SENSITIVITY
            or r.get("status") != "ok"
            or not r.get("speedup")
        ):
            continue
        members = r.get("members", [r["layer"]])
        if not all(m in static for m in members):
            continue
        drop = max(0.0, float(r["metric_drop"]))
        out.append(
            {
                "unit": r["layer"],
                "members": list(members),
                "drop": drop,
                "gain": 1.0 - 1.0 / float(r["speedup"]),
                "speedup": float(r["speedup"]),
            }
        )
    return out


def _target(whole_drop: float, allowed: float) -> float:
    """The predicted drop the plan aims at (see the module doc)."""
    return (NEARLY_LOSSLESS if whole_drop <= allowed else WELL_INSIDE) * allowed


def _prediction(whole: dict | None, units: list[dict], floated: list[dict], baseline: dict) -> dict:
    """The plan's predicted drop, speedup and size (see the module doc)."""
    total = sum(u["drop"] for u in units)
    kept = total - sum(u["drop"] for u in floated)
    if whole is not None:
        drop = float(whole["metric_drop"]) * (kept / total if total > 0 else 1.0)
        lat = 1.0 / float(whole["speedup"])
        size = 1.0 / float(whole["size_ratio"])
    else:
        drop, lat, size = kept, 1.0, 1.0
    for u in floated:  # a unit slower alone in int8 is not faster float amid int8 neighbours
        lat *= max(1.0, u["speedup"])
    lat = min(lat, 1.0)
    pred = {
        "metric_drop": drop,
        "speedup": 1.0 / lat,
        "latency_ms": baseline["latency_ms"] * lat,
        "size_ratio": 1.0 / size,
        "size_bytes": baseline["size_bytes"] * size,
        "budget": None,
    }
    return pred if whole is not None else {**pred, "unprofiled": True}


def mixed_plan(
    space, inventory, profile: dict, allowed_drop: float | None, scale: float = 1.0
) -> Planned | None:
    """int8 static everywhere but the most sensitive units, post-training (the module doc); None when
    there is nothing to keep float. ``scale``: what a mixed plan already run measured over its predicted
    drop (> 1: the profile's subset understated it): every predicted drop is multiplied by it, so the
    plan keeps more units float."""
    static = dict(next((layers for name, layers in uniform_layers(space, inventory) if name == STATIC), {}))
    if not static:
        return None
    units = _sensitivities(profile, static)
    if not any(u["drop"] > 0 for u in units):
        return None
    allowed = allowed_drop or DEFAULT_DROP
    whole = whole_row(profile, STATIC)
    macs = {i.name: i.macs or 0 for i in inventory}
    cap = MAX_FLOAT_MACS * sum(macs[n] for n in static)
    whole_drop = float(whole["metric_drop"]) if whole is not None else sum(u["drop"] for u in units)
    target = _target(whole_drop, allowed)
    floated: list[dict] = []
    used = 0
    ranked = sorted((u for u in units if u["drop"] > 0), key=lambda u: -u["drop"] / max(u["gain"], _EPS))
    for u in ranked:
        if scale * _prediction(whole, units, floated, profile["baseline"])["metric_drop"] <= target:
            break
        cost = sum(macs[m] for m in u["members"])
        if used + cost > cap:
            continue
        floated.append(u)
        used += cost
    if not floated:
        return None
    layers = {k: dict(v) for k, v in static.items() if not any(k in u["members"] for u in floated)}
    n = sum(len(u["members"]) for u in floated)
    name = f"int8 static, {n} sensitive layer{'s' if n != 1 else ''} float"
    kept = ", ".join(u["unit"] for u in floated)
    choices = [f"{name} ({kept}; {len(layers)} layers int8), post-training"]
    predicted = _prediction(whole, units, floated, profile["baseline"])
    predicted["metric_drop"] *= scale
    return Planned(name, layers, predicted, choices, post_training=True)
