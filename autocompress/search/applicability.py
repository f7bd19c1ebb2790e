"""Applicability and coverage, decided on the model itself before the first trial.

**Applicability.** Every (technique, layer) pair the search space allows is tried on the teacher: the
technique is applied to that one layer at its harshest setting in the space (the lowest rank ratio for
each rank mode, the highest structured or unstructured sparsity, 2:4, each bit width below float,
dynamic int8), through the same :func:`~autocompress.pipeline.compress` a trial uses (no fine-tuning),
the result runs one forward pass, and it is lowered by the study's backend (masks, unstructured or 2:4,
keep the baseline's dense graph: they are not lowered again). To stay cheap, the layers of one
technique are first tried together (one compress, one forward, one lowering); only when that fails is
each layer tried alone, so that the failing ones are found and the others kept. Structured pruning
couples layers (a residual stream, a head split): layers that pass alone are tried together again and
one that breaks the set kept so far is excluded too. Layers tried alone are tried once per structural role
(:mod:`.roles`: the same part of identical blocks, at the same setting), the verdict holding for every member:
the check's cost grows with the model's distinct structure, not its depth.

A pair *fails* (its compress, forward or lowering raises) or has *no effect* (the pipeline skips it:
a depthwise conv cannot be factorized, a layer produces the model output, 2:4 needs input channels in
fours). Either way its choice is removed from that layer's domain (rank choices collapse to 1.0, the
sparsity kind or bit width leaves the choices), so that no trial can fail, or repeat the baseline, for
a technique that could never apply. Layers sharing a parameter (``groups``) lose the choice together.

What the narrowed space can change of the model, and what it cannot, is :mod:`.coverage`'s.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..inventory import LayerInfo
from ..pipeline import compress
from ..plan import LayerPlan, Plan
from ..registry import TECHNIQUES
from ..scratch import scratch_dir
from ..space import SearchSpace
from ..tasks import Task
from ..tasks.data import deployable
from .applicability_result import Applicability, PairCheck, summary_lines  # noqa: F401 - re-exported
from .narrowing import MODEL, check_settings, narrowed_domains  # noqa: F401 - MODEL re-exported
from .roles import role_key, structural_roles

CALIBRATION_SAMPLES = 16  # activation ranges for a lowering that only has to succeed


@dataclass
class _Kind:
    """One technique to check: the plan of a layer at its harshest setting, and what leaves the domain."""

    technique: str
    dim: str  # the categorical dimension whose value is removed on failure
    value: object
    setting: str
    plans: dict[str, LayerPlan]  # layer -> its harshest plan (only layers whose domain allows it)
    coupled: bool = False  # structured pruning: layers that pass alone are tried together again
    lowers: bool = True  # masks (unstructured, 2:4) keep the baseline's graph: no lowering to check
    skipped: tuple[str, ...] = ()  # note fragments saying the pipeline skipped the technique


def _kinds(space: SearchSpace, inventory: list[LayerInfo]) -> list[_Kind]:
    """The registered techniques' probes of every layer, grouped by probe key (pipeline order)."""
    kinds: dict[tuple, _Kind] = {}
    specs = [t for t in TECHNIQUES.specs() if t.probes is not None]
    for info in inventory:
        params = space.layer_params(info)
        for probe in (p for t in specs for p in t.probes(params, info, space.allowed_by_kind)):
            k = kinds.setdefault(
                probe.key,
                _Kind(
                    probe.technique,
                    probe.dim,
                    probe.value,
                    probe.setting,
                    {},
                    probe.coupled,
                    probe.lowers,
                    probe.skipped,
                ),
            )
            k.plans[info.name] = LayerPlan(**probe.layer)
    return list(kinds.values())


def _no_effect(kind: _Kind, note: str) -> bool:
    """Whether the pipeline's note says the layer's technique was skipped."""
    return bool(note) and any(s in note for s in kind.skipped)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:400]


def _attribute_hint(model: nn.Module, layer: str, reason: str) -> str:
    """Name the module that reads the replaced layer's weight by attribute (a factorized layer has none)."""
    if "has no attribute 'weight'" not in reason or "." not in layer:
        return reason
    parent_name, child = layer.rsplit(".", 1)
    parent = model.get_submodule(parent_name)
    if isinstance(parent, nn.MultiheadAttention):
        return (
            f"nn.MultiheadAttention reads {child}.weight directly in its forward, so a factorized "
            f"{child} (two Linear layers) breaks it ({reason}); a factorization that keeps .weight "
            "(torch.nn.utils.parametrize) would be lowered as the dense product: no saving"
        )
    return f"{type(parent).__name__} reads {child}.weight directly (e.g. an inference fast path) ({reason})"


class _Checker:
    def __init__(
        self,
        task: Task,
        teacher: nn.Module,
        backend,
        seed: int,
        tmp: Path,
        roles: dict[str, str] | None = None,
    ):
        self.task, self.teacher, self.backend, self.seed, self.tmp = task, teacher, backend, seed, tmp
        self.roles = roles or {}  # layer -> structural role (.roles): one check per role and setting
        self.lowerings = self.applies = 0
        self.together: tuple[str, str] | None = None  # why the layers of the last kind failed together
        self.shared: dict[str, str] = {}  # last kind: member -> the layer whose failing verdict it took

    def representatives(self, plans: dict[str, LayerPlan]) -> dict[str, str]:
        """layer -> the first layer of its role with the same plan (itself when it is the first)."""
        first: dict[str, str] = {}
        return {n: first.setdefault(role_key(self.roles, {n: lp}), n) for n, lp in plans.items()}

    def apply(self, layers: dict[str, LayerPlan]):
        """compress + forward; returns (result, None) or (None, (stage, reason))."""
        self.applies += 1
        try:
            out = compress(
                self.task,
                self.teacher,
                Plan(layers=layers, epochs=0, seed=self.seed),
                reduce_range=self.backend.reduce_range,
                round_to=self.backend.preferred_channel_multiple,
            )
        except Exception as exc:
            return None, ("apply", _one_line(exc))
        try:
            with torch.no_grad():
                deployable(out.model, self.task.io)(*self.task.example_inputs())
        except Exception as exc:
            return None, ("forward", _one_line(exc))
        return out, None

    def lower(self, out, kind: _Kind) -> tuple[str, str] | None:
        """Lower ``out`` with the study's backend (not for masks: the graph is the baseline's)."""
        if not kind.lowers:
            return None
        self.lowerings += 1
        task = self.task
        try:
            self.backend.lower(
                deployable(out.model, task.io),
                task.example_inputs(),
                out.lowering,
                self.tmp / f"a{self.lowerings}",
                calibration=task.calibration_inputs(CALIBRATION_SAMPLES) if out.lowering else None,
                io=task.io,
            )
        except Exception as exc:
            return "lowering", _one_line(exc)
        return None

    def run(self, kind: _Kind) -> dict[str, tuple[str, str, str]]:
        """layer -> (status, stage, reason) for every layer of ``kind``.

        All layers together first (one compress, one forward, one lowering); when that fails, each layer
        alone (apply + forward), then each one's lowering alone. A coupled technique (structured pruning:
        pruned together, layers of one residual stream or head split stay consistent, alone they may
        not) starts with each layer alone, then tries the passing ones together (a layer that breaks the
        set fails, see :meth:`_greedy`) for one lowering.
        """
        verdict: dict[str, tuple[str, str, str]] = {}
        self.together = None
        self.shared = {}
        if not kind.coupled:  # a coupled technique applied everywhere is another experiment than alone
            out, err = self.apply(kind.plans)
            err = err or self.lower(out, kind)
            if err is None:
                for layer in kind.plans:
                    note = out.notes.get(layer, "")
                    verdict[layer] = (
                        ("no effect", "apply", note) if _no_effect(kind, note) else ("ok", "", "")
                    )
                return verdict
            self.together = err
        passed: dict[str, object] = {}
        rep = self.representatives(kind.plans)
        for layer, lp in kind.plans.items():  # each layer alone (one per role): apply + forward
            if rep[layer] != layer:  # a later member of a role: its first member's verdict
                if rep[layer] in passed:
                    passed[layer] = passed[rep[layer]]
                else:
                    verdict[layer] = self._as_member(layer, verdict[rep[layer]], rep[layer])
                continue
            out, err = self.apply({layer: lp})
            if err is not None:
                verdict[layer] = ("fails", err[0], _attribute_hint(self.teacher, layer, err[1]))
                continue
            note = out.notes.get(layer, "")
            if _no_effect(kind, note):
                verdict[layer] = ("no effect", "apply", note)
                continue
            passed[layer] = out
        if not passed:
            return verdict
        if kind.coupled:  # the layers that passed, together; one lowering, each layer alone if that fails
            out, err = self.apply({n: kind.plans[n] for n in passed})
            if err is not None:  # coupled layers (one residual stream, one head split) break together
                out, passed = self._greedy(kind, passed, verdict)
            if out is not None and self.lower(out, kind) is None:
                verdict.update({n: ("ok", "", "") for n in passed})
                return verdict
        lowered: dict[str, tuple[str, str, str]] = {}
        for layer, out in passed.items():  # each one's lowering alone (one per role)
            if rep[layer] in lowered:
                verdict[layer] = self._as_member(layer, lowered[rep[layer]], rep[layer])
                continue
            err = self.lower(out, kind)
            verdict[layer] = lowered[layer] = ("fails", *err) if err else ("ok", "", "")
        return verdict

    def _as_member(self, layer: str, verdict: tuple[str, str, str], first: str) -> tuple[str, str, str]:
        """The verdict of a role's first layer, for another member (its reason says whose it is; a verdict
        other than ``ok`` is recorded in :attr:`shared`: member -> the layer checked)."""
        status, stage, reason = verdict
        if status == "ok":
            return verdict
        self.shared[layer] = first
        return (status, stage, f"{reason} (checked on {first}, the same structure)")

    def _greedy(self, kind: _Kind, passed: dict, verdict: dict):
        """Add the layers one at a time (inventory order); one that breaks the set kept so far fails.

        Returns the result of the kept set (None if none) and the kept layers (each with its own result).
        """
        kept: dict[str, object] = {}
        out = None
        for layer, alone in passed.items():
            if not kept:
                kept[layer], out = alone, alone
                continue
            joint, err = self.apply({n: kind.plans[n] for n in [*kept, layer]})
            if err is None:
                kept[layer], out = alone, joint
                continue
            verdict[layer] = (
                "fails",
                f"{err[0]} (jointly)",
                f"works alone, fails together with {', '.join(kept)} at the same setting: {err[1]}",
            )
        return out, kept


def check_applicability(
    task: Task,
    teacher: nn.Module,
    inventory: list[LayerInfo],
    space: SearchSpace,
    backend,
    *,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
    share_roles: bool = True,
) -> Applicability:
    """Try every (technique, layer) pair the space allows on ``teacher`` (see the module docstring).

    ``share_roles``: layers of one structural role (:mod:`.roles`: the same part of identical blocks)
    with the same setting are checked alone once, the first member's verdict holding for the others
    (the checks of all layers together still run on every member). False checks each layer itself.

    Returns the verdicts and the narrowed domains (Optuna parameter name -> Param as a dict, only the
    parameters that changed); nothing is applied to ``space``.
    """
    t0 = time.perf_counter()
    result = Applicability()
    removals: dict[str, set] = {}
    dims: list[tuple[PairCheck, str]] = []
    threads = torch.get_num_threads()
    # one thread: the check's tensors are small, and LAPACK's SVD on two threads of a busy 2-core
    # machine was measured 20-50x slower (0.8-1.5 s instead of 0.03-0.04 s for a 128 x 576 weight)
    torch.set_num_threads(1)
    try:
        roles = (
            structural_roles(teacher, [i.name for i in inventory], task.example_inputs(), task.io)
            if share_roles
            else {}
        )
        _check_all(task, teacher, inventory, space, backend, seed, result, removals, dims, roles)
        result.roles = len(set(roles.values())) if roles else len(inventory)
    finally:
        torch.set_num_threads(threads)
    result.domains, described = narrowed_domains(space, inventory, removals)
    for c, dim in dims:
        c.removed = described.get((c.layer, dim), "") if c.status != "ok" else ""
    check_settings(teacher, space, result)
    result.seconds = time.perf_counter() - t0
    if log is not None:
        for line in summary_lines(result):
            log(line)
    return result


def _check_all(task, teacher, inventory, space, backend, seed, result, removals, dims, roles) -> None:
    with scratch_dir("ac-applicability-") as tmp:
        checker = _Checker(task, teacher, backend, seed, Path(tmp), roles)
        for kind in _kinds(space, inventory):
            verdicts = checker.run(kind)
            if checker.together is not None and all(v[0] == "ok" for v in verdicts.values()):
                stage, reason = checker.together
                result.interactions.append(
                    f"{kind.technique} at {kind.setting} on all {len(verdicts)} layers together fails "
                    f"({stage}: {reason}), on each layer alone it works: a trial may still fail"
                )
            for layer, (status, stage, reason) in verdicts.items():
                checked_on = checker.shared.get(layer, "")
                result.checks.append(
                    PairCheck(
                        layer, kind.technique, kind.setting, status, stage, reason, checked_on=checked_on
                    )
                )
                dims.append((result.checks[-1], kind.dim))
                if status != "ok":
                    removals.setdefault(f"{layer}|{kind.dim}", set()).add(kind.value)
        result.lowerings, result.applies = checker.lowerings, checker.applies
