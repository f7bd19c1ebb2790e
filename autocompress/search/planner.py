"""Planned starts: a handful of plans predicted, from the latency and accuracy profiles, to lie on the
(metric, latency, size) front at different trade-offs; enqueued as a study's first trials.

The model combines per-layer choices, each measured alone against the baseline
(:mod:`.latency_profile`): the predicted latency is the chosen precision base's (float, or a measured
whole-model int8 row) times the product of the other choices' latency ratios (each choice takes its
share of what is left: a sum of relative savings ran past the whole model's time on mnist1d_cnn,
predicting 42x for a plan measured at 3.7x); the predicted size the same with sizes; the predicted
metric drop the sum of the drops (no fine-tuning: the trial fine-tunes, so its drop is usually far
smaller). Layers sharing a parameter (``groups``) choose together.

Per drop budget (:data:`SPEED_BUDGETS` times the study's allowed drop) a greedy knapsack adds the
choice with the most predicted latency saved per point of drop (replacing a milder choice of the same
layer; one choice per layer besides a whole-model int8 base) while the summed drop fits; one more plan
saves size the same way; and :func:`uniform_plans` adds, outside the budgets, the same channel removal
on every layer (one plan per profiled level). Plans whose
compressed models have the same structure (layer shapes and lowering: 40% and 50% of channels that
round to the same widths) are merged before they are enqueued. Each planned trial records its
prediction in the user attr ``planned``; the report compares it with what the trial measured.

Domains are not narrowed from the profile: a choice that is slower and less accurate alone is still
smaller (4-bit), or pays only together with its neighbours (int8), so no choice is "never worth it" on
the evidence of one-layer rows.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

# x the study's allowed metric drop: the profile's drops are before fine-tuning, which recovers most
# (measured: a plan predicted to lose 0.25 lost 0.001 after fine-tuning), so the harshest budget lets
# in uniform channel removal of the kind that hand-written warm starts used to encode
SPEED_BUDGETS = (1.0, 4.0, 16.0, 64.0)
SIZE_BUDGET = 1.0
DEFAULT_DROP = 0.01  # the allowed drop when the study sets no metric budget
_EPS = 1e-3  # a drop measured as 0 still costs this much in the greedy's ratio


@dataclass
class Option:
    """One choice of one unit (a layer or a group of layers sharing parameters)."""

    unit: str
    kind: str  # "precision" or "structure"
    label: str
    fields: dict[str, dict]  # layer -> LayerPlan fields
    dlat: float  # relative latency change against the baseline (-0.2: 20% less time)
    drop: float
    dsize: float


@dataclass
class Planned:
    """One plan: per-layer fields, what it is for and what the model predicts."""

    name: str
    layers: dict[str, dict]
    predicted: dict
    choices: list[str] = field(default_factory=list)
    merged: list[str] = field(default_factory=list)
    post_training: bool = False  # the trial compresses without fine-tuning (the peers' one-call answers)


def _option(unit: str, kind: str, label: str, fields: dict, rows: list[dict]) -> Option:
    """The choice of a unit (one row per member layer): the members' latency and size ratios multiply,
    as choices of different units do. A sum of savings counts twice what neighbours share (removing a
    conv's outputs also narrows the next conv's inputs, so both rows hold that saving): on ResNet-18's
    stage groups it predicted 66x for 37.5% of every channel removed."""
    lat = size = 1.0
    for r in rows:
        lat *= 1.0 / r["speedup"]
        size *= r["size_ratio"] ** -1
    return Option(
        unit, kind, label, fields, lat - 1.0, sum(max(0.0, r["metric_drop"]) for r in rows), size - 1.0
    )


def _kind(label: str) -> str:
    """A profile setting's kind: ``precision`` (a bit width) or ``structure``."""
    return "precision" if "bit" in label else "structure"


def options(profile: dict, space) -> tuple[list[Option], list[Option]]:
    """(precision bases: float + the whole-model rows, per-unit options) from the profile's rows."""
    ok = [r for r in profile["rows"] if r.get("status") == "ok" and r.get("speedup")]
    bases = [Option("*", "base", "float", {}, 0.0, 0.0, 0.0)]
    bases += [_option("*", "base", r["setting"], r["values"], [r]) for r in ok if r["layer"] == "*"]
    by_unit: dict[tuple[str, str], list[dict]] = {}
    members: dict[str, set[str]] = {}
    out = []
    for r in ok:
        if "members" in r:  # a group measured as one row
            out.append(_option(r["layer"], _kind(r["setting"]), r["setting"], r["values"], [r]))
        elif r["layer"] != "*":
            unit = space.group_of(r["layer"])
            by_unit.setdefault((unit, r["setting"]), []).append(r)
    for r in profile["rows"]:
        if r["layer"] != "*" and "members" not in r:
            members.setdefault(space.group_of(r["layer"]), set()).add(r["layer"])
    for (unit, label), rows in by_unit.items():
        if {r["layer"] for r in rows} != members[unit]:
            continue  # a member of the group was not measured: the group cannot be predicted
        out.append(_option(unit, _kind(label), label, {r["layer"]: r["values"] for r in rows}, rows))
    return bases, out


def predict(base: Option, chosen: list[Option], baseline: dict) -> dict:
    """The model's metric drop (summed), speedup, latency and size (products of ratios) of a base plus
    choices."""
    lat, size = 1.0 + base.dlat, 1.0 + base.dsize
    for o in chosen:
        lat *= max(0.05, 1.0 + o.dlat)
        size *= max(0.01, 1.0 + o.dsize)
    return {
        "metric_drop": base.drop + sum(o.drop for o in chosen),
        "speedup": 1.0 / lat,
        "latency_ms": baseline["latency_ms"] * lat,
        "size_bytes": baseline["size_bytes"] * size,
        "size_ratio": 1.0 / size,
    }


def greedy(base: Option, opts: list[Option], budget: float, objective: str) -> list[Option]:
    """Choices (one per unit) by most ``objective`` (``dlat`` or ``dsize``) saved per point of drop.

    One choice per unit: the profile measured each alone, and two on one layer (4 bits and a rank
    ratio) save the same bytes twice in a sum."""
    usable = [
        o for o in opts if base.label == "float" or o.kind == "structure"
    ]  # a whole-model base: its bits
    chosen: dict[str, Option] = {}
    drop = base.drop
    while True:
        best, best_ratio = None, 0.0
        for o in usable:
            cur = chosen.get(o.unit)
            gain = (getattr(cur, objective) if cur else 0.0) - getattr(o, objective)
            extra = o.drop - (cur.drop if cur else 0.0)
            if gain <= 1e-6 or drop + extra > budget + 1e-12:
                continue
            ratio = gain / max(extra, _EPS)
            if ratio > best_ratio:
                best, best_ratio = o, ratio
        if best is None:
            return list(chosen.values())
        cur = chosen.get(best.unit)
        drop += best.drop - (cur.drop if cur else 0.0)
        chosen[best.unit] = best


def _layers(base: Option, chosen: list[Option]) -> dict[str, dict]:
    out: dict[str, dict] = {k: dict(v) for k, v in base.fields.items()}
    for o in chosen:
        for layer, f in o.fields.items():
            out.setdefault(layer, {}).update(f)
    return out


def plan_candidates(profile: dict, space, max_drop: float | None) -> list[Planned]:
    """The speed-oriented plans (one per budget) and the size-oriented one, before merging."""
    max_drop = max_drop or DEFAULT_DROP
    bases, opts = options(profile, space)
    baseline = profile["baseline"]
    out = []
    targets = [(f"speed, drop <= {f:g}x budget", f * max_drop, "dlat") for f in SPEED_BUDGETS]
    targets.append((f"size, drop <= {SIZE_BUDGET:g}x budget", SIZE_BUDGET * max_drop, "dsize"))
    for name, budget, objective in targets:
        best = None
        for base in bases:
            if base.drop > budget:
                continue
            chosen = greedy(base, opts, budget, objective)
            pred = predict(base, chosen, baseline)
            score = -pred["speedup"] if objective == "dlat" else pred["size_bytes"]
            if best is None or score < best[0] - 1e-9:
                best = (score, base, chosen, pred)
        if best is None:
            continue
        _, base, chosen, pred = best
        labels = [base.label] + [f"{o.unit} {o.label}" for o in chosen]
        out.append(Planned(name, _layers(base, chosen), {**pred, "budget": budget}, labels))
    uniform = uniform_plans(bases, opts, baseline, space, profile["rows"], max_drop)
    out[len(SPEED_BUDGETS) - 1 : len(SPEED_BUDGETS) - 1] = uniform
    return out


def _level(label: str) -> float:
    return float(label.split()[1])


def beyond(p, top: float) -> float | None:
    """The sparsity halfway from ``top`` to the top of the domain ``p`` (on its grid; for choices the
    one nearest that point), if it lies above ``top``."""
    if p.fixed is not None:
        return None
    if p.choices is not None:
        above = [float(v) for v in p.choices if float(v) > top]
        if not above:
            return None
        mid = (top + max(above)) / 2
        return min(above, key=lambda v: (abs(v - mid), v))
    v = (top + p.high) / 2
    if p.step:
        v = p.low + int((v - p.low) / p.step + 1e-9) * p.step
    v = round(min(v, p.high), 6)
    return v if v > top + 1e-9 else None


def heads_at(space, layers, level: float) -> dict[str, dict]:
    """``heads_kept`` nearest ``1 - level`` (below 1; the milder on a tie) on every one of ``layers`` whose
    domain searches head pruning: a uniform plan removes heads as it removes channels. The profile does
    not measure head pruning (it changes a whole attention, not one layer's output channels)."""
    out: dict[str, dict] = {}
    for layer in layers:
        p = space.layer_domains(layer).get("heads_kept")
        if p is None or p.fixed is not None or p.choices is None:
            continue
        kept = [float(v) for v in p.choices if float(v) < 1.0]
        if kept:
            out[layer] = {"heads_kept": min(kept, key=lambda v: (abs(v - (1.0 - level)), -v))}
    return out


def _with_heads(layers: dict[str, dict], labels: list[str], space, names, level: float) -> dict[str, dict]:
    """``layers`` with :func:`heads_at` added (and a label saying so)."""
    heads = heads_at(space, names, level) if space is not None else {}
    for layer, f in heads.items():
        layers.setdefault(layer, {}).update(f)
    for kept in sorted({f["heads_kept"] for f in heads.values()}, reverse=True):
        n = sum(f["heads_kept"] == kept for f in heads.values())
        labels.append(f"heads {kept:g} on {n} attention{'s' if n != 1 else ''}")
    return layers


def uniform_plans(
    bases: list[Option],
    opts: list[Option],
    baseline: dict,
    space=None,
    rows: list[dict] | None = None,
    max_drop: float | None = None,
) -> list[Planned]:
    """The fastest measured precision base within ``max_drop`` (float when none is: fine-tuning recovers
    removed channels, not a precision that broke the model, e.g. static int8 on an encoder whose
    activations carry outliers) with the same channel removal on every unit that has it
    (one plan per profiled structured level, milder first): the one-layer drops before fine-tuning
    add up past any budget, yet fine-tuning recovers uniform removal well (the shipped studies'
    former hand-written warm starts were such plans), so these go in outside the drop budgets.

    With the ``space``, one more: halfway from the highest profiled level to the top of each layer's
    domain (:func:`beyond`), where the profile does not reach (it measures :data:`LEVELS` only, to fit
    its budget). Its prediction is the highest profiled level's (``extrapolated_from``): a lower bound
    on the speedup, reported against the measured result like every prediction.

    Every uniform plan also prunes attention heads at its level where the space searches them
    (:func:`heads_at`). With the profile's ``rows``, a structured level whose rows the profile could not
    measure (over its budget: on a BERT encoder one row is a 15 s lowering, past a post-training trial's
    budget after five rows) still gets its uniform plan, predicted as the base alone (``unprofiled``)."""
    base = min(
        (b for b in bases if max_drop is None or b.drop <= max_drop or b.label == "float"),
        key=lambda b: b.dlat,
    )
    levels = sorted({o.label for o in opts if o.label.startswith("structured ")}, key=_level)
    names = sorted({n for r in rows or () if r["layer"] != "*" for n in r.get("members", [r["layer"]])})
    out = []
    for level in levels:
        chosen = [o for o in opts if o.label == level]
        pred = predict(base, chosen, baseline)
        labels = [base.label, f"{level} on {len(chosen)} layers"]
        layers = _with_heads(_layers(base, chosen), labels, space, names, _level(level))
        out.append(Planned(f"uniform {level}", layers, {**pred, "budget": None}, labels))
    unmeasured: dict[str, dict[str, dict]] = {}
    for r in rows or ():
        if (
            r["layer"] != "*"
            and r["setting"].startswith("structured ")
            and r["setting"] not in levels
            and r.get("status") in ("ok", "not measured")
        ):
            unmeasured.setdefault(r["setting"], {}).update(
                r["values"] if "members" in r else {r["layer"]: r["values"]}
            )
    for level in sorted(unmeasured, key=_level):
        layers = _layers(base, [])
        for layer, f in unmeasured[level].items():
            layers.setdefault(layer, {}).update(f)
        labels = [base.label, f"{level} on {len(unmeasured[level])} layers (not profiled)"]
        layers = _with_heads(layers, labels, space, names, _level(level))
        pred = {**predict(base, [], baseline), "budget": None, "unprofiled": True}
        out.append(Planned(f"uniform {level}", layers, pred, labels))
    if space is None or not levels:
        return out
    chosen = [o for o in opts if o.label == levels[-1]]
    layers = _layers(base, chosen)
    further = {}
    for o in chosen:
        for layer in o.fields:
            further[layer] = beyond(space.layer_domains(layer)["sparsity"], _level(levels[-1]))
    if not further or None in further.values():
        return out
    for layer, v in further.items():
        layers[layer]["sparsity"] = v
    shown = "/".join(f"{v:g}" for v in sorted(set(further.values())))
    pred = {**predict(base, chosen, baseline), "budget": None, "extrapolated_from": levels[-1]}
    labels = [base.label, f"structured {shown} on {len(chosen)} layers (beyond the profile)"]
    out.append(Planned(f"uniform structured {shown}", layers, pred, labels))
    return out


def structure_key(compressed) -> str:
    """What the artifact's graph depends on: every tensor's shape and each module's lowering."""
    shapes = [[k, list(v.shape)] for k, v in sorted(compressed.model.state_dict().items())]
    lowering = {
        k: [v.bits, v.mode, v.scheme, v.granularity] for k, v in sorted(compressed.lowering.layers.items())
    }
    blob = json.dumps([shapes, lowering], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def merge_same_structure(plans: list[Planned], key_of) -> list[Planned]:
    """Plans whose ``key_of(plan)`` is equal are one plan (the first; the others listed in ``merged``)."""
    kept: dict[str, Planned] = {}
    for p in plans:
        k = key_of(p)
        if k in kept:
            kept[k].merged.append(p.name)
        else:
            kept[k] = p
    return list(kept.values())


def layer_values(planned: Planned, inventory) -> dict[str, dict]:
    """Every per-layer field of every layer (the technique's default where the plan leaves it)."""
    from ..registry import TECHNIQUES

    return {
        info.name: {
            d.name: planned.layers.get(info.name, {}).get(d.name, d.default) for d in TECHNIQUES.dims()
        }
        for info in inventory
    }
