"""What the latency profile measures (:mod:`.latency_profile`): the settings tried on each layer, the
whole-model int8 rows, the units (a layer, or a group of the space changed together) and the rows in
profiling order."""

from __future__ import annotations

from ..context import RunContext
from .one_shot import PROFILE_LABELS, uniform_layers
from .one_shot_mixed import SENSITIVITY

LEVELS = (0.25, 0.5)  # structured sparsity and rank ratio levels tried (clipped into the domain)


def _levels(p, levels=LEVELS) -> list[float]:
    """The levels of a searched sparsity / rank domain the profile tries (within it, on its grid)."""
    if p.fixed is not None:
        return [float(p.fixed)]
    if p.choices is not None:
        return [float(v) for v in p.choices]
    out = []
    for v in levels:
        v = min(max(v, p.low), p.high)
        if p.step:
            v = p.low + round((v - p.low) / p.step) * p.step
        out.append(round(v, 6))
    return sorted(set(out))


def layer_settings(space, info) -> list[tuple[str, dict]]:
    """``(label, LayerPlan fields)`` of every setting the profile measures on one layer."""
    params = space.layer_params(info)
    grid = space.allowed_by_kind.get("quant_granularity", {}).get(info.kind, ())
    extra = {"quant_granularity": grid[0]} if grid and "channel" not in grid else {}
    out: list[tuple[str, dict]] = []
    for b in sorted({int(v) for v in params["bits"].values() if int(v) < 32}, reverse=True):
        out.append((f"{b}-bit", {"bits": b, **extra}))
        if b == 8 and "dynamic" in [str(v) for v in params["quant_mode"].values()]:
            out.append(("8-bit dynamic", {"bits": 8, "quant_mode": "dynamic", **extra}))
    if "structured" in [str(v) for v in params["sparsity_kind"].values()]:
        for s in _levels(params["sparsity"]):
            if s > 0:
                out.append((f"structured {s:g}", {"sparsity": s, "sparsity_kind": "structured"}))
    mode = str(params["rank_mode"].values()[0])
    for r in _levels(params["rank_ratio"]):
        if r < 1.0:
            out.append((f"rank {r:g}", {"rank_ratio": r, "rank_mode": mode}))
    init = str(params["share_init"].values()[0])  # weight sharing: the fewest shared values (size, load)
    shared = [int(v) for v in params["share_bits"].values() if int(v) > 0]
    if shared:
        out.append((f"shared {2 ** min(shared)} values", {"share_bits": min(shared), "share_init": init}))
    for m in sorted({int(v) for v in params["separable"].values()} - {0}):  # depthwise-separable
        if info.kind == "Conv2d" and info.groups == 1 and max(info.kernel) > 1:
            out.append((f"separable x{m}", {"separable": m}))
    if "linear" in [str(v) for v in params["attention"].values()]:  # its attention block, kernelized
        out.append(("linear attention", {"attention": "linear"}))
    return out


def uniform_settings(space, inventory) -> list[tuple[str, dict[str, dict]]]:
    """``(label, {layer: fields})`` of the whole-model int8 rows: the one-shot plans' layers
    (:func:`.one_shot.uniform_layers`: static on each layer whose domain allows it; dynamic on the Linear
    layers with int8 tables), when they change more than one layer."""
    return [
        (PROFILE_LABELS[name], layers) for name, layers in uniform_layers(space, inventory) if len(layers) > 1
    ]


def units(space, inventory) -> list[tuple[str, list]]:
    """``(unit, member layers)``, largest first (MACs): a layer alone, or the layers of a group of the
    space (``groups``), which share their parameters and so change together."""
    by: dict[str, list] = {}
    for info in inventory:
        by.setdefault(space.group_of(info.name), []).append(info)
    return sorted(by.items(), key=lambda kv: -sum(i.macs for i in kv[1]))


def _items(ctx: RunContext) -> list[tuple[str, str, dict[str, dict]]]:
    """``(unit or '*', label, {layer: fields})`` in profiling order: whole-model rows, then units by MACs.

    A group is profiled as one row per setting, its members changed together (a setting every member
    offers): one row per member measured the members' coupled channels several times (removing a
    stage conv's outputs removes those of every conv DepGraph couples to it), and a product of such rows
    predicted ResNet-18's stage plans at 2-6x what they measured."""
    items = [("*", label, layers) for label, layers in uniform_settings(ctx.space, ctx.inventory)]
    for unit, infos in units(ctx.space, ctx.inventory):
        offered = [dict(layer_settings(ctx.space, i)) for i in infos]
        if len(infos) == 1:
            items += [(infos[0].name, label, {infos[0].name: v}) for label, v in offered[0].items()]
            continue
        for label in [lb for lb in offered[0] if all(lb in o for o in offered)]:
            items.append((unit, label, {i.name: o[label] for i, o in zip(infos, offered, strict=True)}))
    # every unit's 8-bit row first: the sensitivity .one_shot_mixed plans from covers every unit
    return sorted(items, key=lambda it: 0 if it[0] == "*" else 1 if it[1] == SENSITIVITY else 2)
