"""Sparsity: the technique family of ``sparsity`` and ``sparsity_kind`` (unstructured, structured, 2:4).

- ``unstructured``: magnitude masks; the fraction ``sparsity`` of the weights is zero at the end of the
  schedule (:mod:`.prune`, :mod:`.schedules`);
- ``structured``: the fraction ``sparsity`` of output channels is removed (:mod:`.structured`): once,
  before low rank, or step by step during fine-tuning with a non-one-shot schedule;
- ``2:4``: two of every four consecutive input weights are zero (``sparsity`` is ignored).

Pipeline steps: structured one-shot pruning (order 10, before low rank), then masks and the channel
schedule (order 30, after low rank).
"""

from __future__ import annotations

import math

import torch

from ..registry import TECHNIQUES, Dim, Probe, TechniqueSpec
from ..tasks.data import deployable
from ._build import Build
from .prune import apply_masks, set_nm, set_sparsity
from .schedules import SCHEDULES, sparsity_at
from .structured import IMPORTANCES, ChannelSchedule, output_layers, prune_to_widths, target_width

SPARSITY_KINDS = ("unstructured", "structured", "2:4")


def _sparsity_rule(v) -> str | None:
    ok = isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v < 1 and not math.isnan(v)
    return None if ok else "is outside [0, 1)"


def _importance_data(build: Build):
    """(inputs, targets) of 256 training samples for the Taylor importance (None for l1 / l2)."""
    return build.task.train_split.first(256) if build.plan.importance == "taylor" else None


def _structured_ratios(build: Build, layers) -> dict[str, float]:
    plan = build.plan
    return {
        name: plan.layer(name).sparsity
        for name in layers
        if plan.layer(name).sparsity_kind == "structured" and plan.layer(name).sparsity > 0
    }


def structured_once(build: Build) -> None:
    """Remove output channels of the layers planned ``structured`` (one shot, before fine-tuning)."""
    if build.iterative:
        return
    ratios = _structured_ratios(build, build.layers())
    if not ratios:
        return
    notes, modules = build.notes, dict(build.student.named_modules())
    widths = {n: target_width(modules[n].weight.shape[0], r, build.round_to) for n, r in ratios.items()}
    model, example = deployable(build.student, build.task.io), build.task.example_inputs(2)
    outputs = output_layers(model, example)
    changes = prune_to_widths(
        model,
        example,
        widths,
        importance=build.plan.importance,
        round_to=build.round_to,
        data=_importance_data(build),
    )
    for name in ratios:
        if name in changes:
            notes[name] = f"structured: output channels {changes[name][0]} -> {changes[name][1]}"
        elif name in outputs:
            notes[name] = "structured: not pruned (the layer produces the model output)"
        elif widths[name] >= modules[name].weight.shape[0]:
            notes[name] = (
                f"structured: not pruned ({ratios[name]:g} of {widths[name]} output channels rounds to "
                f"none at multiples of {build.round_to})"
            )
        else:  # e.g. its channels tied to a width torch-pruning does not change (a head count, a residual)
            notes[name] = "structured: not pruned (torch-pruning left the layer as is)"
    for name, (before, after) in changes.items():  # coupled layers pruned with their group
        notes.setdefault(name, f"structured (coupled): output channels {before} -> {after}")


def _channel_schedule(build: Build) -> ChannelSchedule | None:
    """The iterative structured pruning of the layers planned ``structured`` (None if none).

    A factorized layer's output channels are those of its last factor.
    """
    origin = build.layers()
    last = {layer: name for name, layer in origin.items()}  # origin lists a layer's factors in order
    final = {last[layer]: r for layer, r in _structured_ratios(build, dict.fromkeys(origin.values())).items()}
    if not final:
        return None
    s = build.plan.schedule
    return ChannelSchedule(
        deployable(build.student, build.task.io),
        build.task.example_inputs(2),
        final,
        s.kind,
        s.start,
        s.end,
        s.steps,
        importance=build.plan.importance,
        round_to=build.round_to,
        data=_importance_data(build),
    )


def _channel_notes(build: Build, channels: ChannelSchedule) -> None:
    s, n, origin, notes = build.plan.schedule, len(channels.history), build.layers(), build.notes
    how = f"{s.kind} schedule, {n} step{'s' if n != 1 else ''}"
    for name in channels.final:
        layer = origin.get(name, name)
        if name in channels.changes:
            before, after = channels.changes[name]
            notes[layer] = f"structured ({how}): output channels {before} -> {after}"
        else:
            notes[layer] = f"structured ({how}): not pruned (torch-pruning left the layer as is)"
    for name in channels.skipped:
        notes[origin.get(name, name)] = "structured: not pruned (the layer produces the model output)"
    for name, (before, after) in channels.changes.items():  # coupled layers pruned with their group
        notes.setdefault(
            origin.get(name, name), f"structured (coupled, {how}): output channels {before} -> {after}"
        )


def _nm_layers(build: Build, kinds: dict[str, str]) -> set[str]:
    """The layers planned 2:4 whose input channels allow it (the others get a note)."""
    nm = set()
    for name, layer in build.layers().items():
        if kinds[name] == "2:4":
            c_in = build.modules[name].weight.shape[1]
            if c_in % 4 == 0:
                nm.add(name)
            else:
                build.notes[layer] = (
                    f"2:4 not applied to {name}: {c_in} input channels are not a multiple of 4"
                )
    return nm


def _drop_broken_nm(build: Build, nm: set) -> None:
    """After input channels were removed, 2:4 masks need input channels that are still a multiple of 4."""
    for name in sorted(nm):
        c_in = build.modules[name].weight.shape[1]
        if c_in % 4:
            nm.discard(name)
            with torch.no_grad():
                mask = next(p for p in build.modules[name].parametrizations.weight if hasattr(p, "mask"))
                mask.mask.fill_(1.0)
            build.notes[build.layers()[name]] = (
                f"2:4 dropped from {name}: structured pruning left {c_in} input channels"
            )


def masks_and_schedule(build: Build) -> None:
    """Masks (unstructured, 2:4) and the iterative channel schedule; hooks that advance both."""
    plan, origin = build.plan, build.layers()
    channels = _channel_schedule(build) if build.iterative else None
    kinds = {name: plan.layer(layer).sparsity_kind for name, layer in origin.items()}
    final = {
        name: (plan.layer(layer).sparsity if kinds[name] == "unstructured" else 0.0)
        for name, layer in origin.items()
    }
    nm = _nm_layers(build, kinds)
    pruned = {n: m for n, m in build.modules.items() if final[n] > 0 or n in nm}
    apply_masks(pruned)
    s = plan.schedule

    def prune_channels_at(progress: float) -> bool:
        """Iterative structured pruning; True when layers got smaller (parameters are new objects)."""
        if channels is None or not channels.step(progress):
            return False
        _drop_broken_nm(build, nm)
        return True

    def update_masks(progress: float) -> bool:
        for n, m in pruned.items():
            if n in nm:
                if progress >= s.start:
                    set_nm(m)
            else:
                set_sparsity(m, sparsity_at(s.kind, final[n], s.start, s.end, progress, s.steps))
        return False

    def finish() -> None:
        if channels is not None:
            _channel_notes(build, channels)
            build.channel_steps = channels.history

    build.progress += [prune_channels_at, update_masks]
    build.finish.append(finish)


def probes(params: dict, info, allowed: dict) -> list[Probe]:
    """Applicability: the highest sparsity of each kind the space allows (2:4 has no ratio)."""
    top = max(float(v) for v in params["sparsity"].values())
    kinds = [str(v) for v in params["sparsity_kind"].values()]
    out = []
    if top > 0 and "structured" in kinds:
        layer = {"sparsity": top, "sparsity_kind": "structured"}
        out.append(
            Probe(
                ("structured", top),
                "structured pruning",
                "sparsity_kind",
                "structured",
                f"sparsity {top:g}",
                layer,
                coupled=True,
                skipped=("not pruned",),
            )
        )
    if top > 0 and "unstructured" in kinds:
        setting = f"sparsity {top:g}"
        out.append(
            Probe(
                ("unstructured", top),
                "unstructured sparsity",
                "sparsity_kind",
                "unstructured",
                setting,
                {"sparsity": top},
                lowers=False,
            )
        )
    if "2:4" in kinds:
        skipped = ("2:4 not applied", "2:4 dropped")
        out.append(
            Probe(
                ("2:4",),
                "2:4 sparsity",
                "sparsity_kind",
                "2:4",
                "2:4",
                {"sparsity_kind": "2:4"},
                lowers=False,
                skipped=skipped,
            )
        )
    return out


def size_floor(params: dict, info, floor: dict) -> None:
    """Structured pruning at its highest ratio removes that share of output and of input channels."""
    if "structured" in {str(k) for k in params["sparsity_kind"].values()}:
        floor["keep"] = 1.0 - max(float(v) for v in params["sparsity"].values())
        floor["elements"] *= floor["keep"] * floor["keep"]


SPEC = TechniqueSpec(
    "sparsity",
    dims=(
        Dim("sparsity", 0.0, cast=float, check=_sparsity_rule, order=20),
        Dim("sparsity_kind", "unstructured", choices=SPARSITY_KINDS, order=30),
    ),
    settings=(
        Dim("importance", "l1", choices=IMPORTANCES),
        Dim("schedule.kind", "one_shot", choices=SCHEDULES),
    ),
    steps=((10, structured_once), (30, masks_and_schedule)),
    probes=probes,
    collapse={"sparsity_kind": ("sparsity", 0.0)},  # no kind left: no sparsity
    size_floor=size_floor,
)
TECHNIQUES.add(SPEC.name, SPEC)
