"""The domains the applicability checks leave (:mod:`.applicability`): a failed or no-effect (technique,
layer) pair removes its choice from that layer's domain (a categorical left with no value switches off
the dimension it enables instead; layers sharing a parameter lose the choice together), and the
plan-wide settings the model as a whole cannot use are removed from theirs (:func:`check_settings`)."""

from __future__ import annotations

from torch import nn

from ..registry import TECHNIQUES
from ..space import Param, SearchSpace
from .applicability_result import Applicability, PairCheck


def show_param(p: Param) -> str:
    """A domain as the applicability summary shows it (``fixed 1.0``, ``{4, 8}``, ``[0.1, 0.9]``)."""
    if p.fixed is not None:
        return f"fixed {p.fixed}"
    if p.choices is not None:
        return "{" + ", ".join(str(v) for v in p.choices) + "}"
    return f"[{p.low:g}, {p.high:g}]"


def narrowed_domains(space: SearchSpace, inventory, removals: dict[str, set]) -> tuple[dict[str, dict], dict]:
    """Domains without the removed values: (Optuna name -> Param dict, (layer, dim) -> description)."""
    domains: dict[str, dict] = {}
    described: dict[tuple[str, str], str] = {}
    collapse = {  # a categorical left with no value: the dimension it enables is switched off instead
        dim: (target, {"fixed": value})
        for t in TECHNIQUES.specs()
        for dim, (target, value) in (t.collapse or {}).items()
    }
    for layer in dict.fromkeys(i.name for i in inventory):
        params = space.layer_domains(layer)
        group = space.group_of(layer)
        for dim in collapse:
            gone = removals.get(f"{layer}|{dim}")
            if not gone:
                continue
            p = params[dim]
            kept = [v for v in p.values() if v not in gone and str(v) not in {str(g) for g in gone}]
            if kept:
                new_name, new = (
                    f"{TECHNIQUES.dim(dim).prefix}.{group}",
                    ({"fixed": kept[0]} if len(kept) == 1 else {"choices": kept}),
                )
            else:
                target, new = collapse[dim]
                new_name = f"{TECHNIQUES.dim(target).prefix}.{group}"
            if new_name in domains and domains[new_name] != new:  # a group member removed more already
                new = intersect(domains[new_name], new)
            domains[new_name] = new
            described[(layer, dim)] = f"{new_name} -> {show_param(Param.model_validate(new))}"
    return domains, described


def intersect(a: dict, b: dict) -> dict:
    """The values two domains (Param dicts) share, else the second one's first value."""
    va = [a["fixed"]] if "fixed" in a else list(a.get("choices", []))
    vb = [b["fixed"]] if "fixed" in b else list(b.get("choices", []))
    both = [v for v in va if v in vb] or vb[:1]
    return {"fixed": both[0]} if len(both) == 1 else {"choices": both}


MODEL = "(model)"  # the layer of a check on the model as a whole (a plan-wide setting)


def check_settings(teacher: nn.Module, space: SearchSpace, result: Applicability) -> None:
    """Plan-wide choices the model as a whole cannot use (the techniques' ``inapplicable``): removed
    from their domains (what no choice is left of falls back to the setting's default)."""
    defaults = {d.short or d.name: d.default for d in TECHNIQUES.settings()}
    for spec in TECHNIQUES.specs():
        if spec.inapplicable is None:
            continue
        for key, (gone, why) in spec.inapplicable(teacher).items():
            p = space.plan_param(key)
            removed = [v for v in p.values() if v in gone]
            if not removed:
                continue
            kept = [v for v in p.values() if v not in gone] or [defaults[key]]
            new = {"fixed": kept[0]} if len(kept) == 1 else {"choices": kept}
            result.domains[key] = new
            result.checks.append(
                PairCheck(
                    MODEL,
                    spec.name,
                    f"{key} {', '.join(map(str, removed))}",
                    "no effect",
                    "apply",
                    why,
                    f"{key} -> {show_param(Param.model_validate(new))}",
                )
            )
