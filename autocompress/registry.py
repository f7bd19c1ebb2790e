"""One small registry type for techniques, backends and tasks."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from .errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> object map whose lookup errors list the known names and suggest the closest."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@registry.register("name")``."""

        def deco(obj: T) -> T:
            self.add(name, obj)
            return obj

        return deco

    def add(self, name: str, obj: T) -> None:
        if name in self._items and self._items[name] is not obj:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._items[name] = obj

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise ConfigError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        known = sorted(self._items)
        close = difflib.get_close_matches(str(name), known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"unknown {self.kind} {name!r}{hint}; known: {', '.join(known)}"

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))


# -- techniques ------------------------------------------------------------------------------------
# A technique is one module under ``autocompress/techniques`` (or anywhere: a test, a plug-in) that
# registers a :class:`TechniqueSpec`: its per-layer fields (:class:`Dim`: plan field, space key, Optuna
# parameter prefix, domain), its pipeline steps with their order, and its cross-field rules. Plan,
# space, warm starts, preflight, applicability, report and the pipeline iterate :data:`TECHNIQUES`.


def _shown(v: Any) -> str:
    return repr(v) if isinstance(v, str) else str(v)


# the layer kinds of the inventory (:func:`autocompress.inventory.layer_kind`): the matmul layers every
# technique may change, and the embedding tables (a lookup: only a per-layer field that says so applies)
MATMUL_KINDS = ("Conv1d", "Conv2d", "Linear")
LAYER_KINDS = (*MATMUL_KINDS, "Embedding")


@dataclass(frozen=True)
class Dim:
    """One per-layer field of a technique.

    Attributes:
        name: the field of :class:`~autocompress.plan.LayerPlan`, the key in a search space file and in a
            warm start (``rank_ratio``).
        default: the value of a layer the plan does not mention (the technique does nothing there).
        short: the Optuna parameter prefix (``rank`` -> ``rank.<layer>``); default: ``name``.
        cast: the type a sampled value is turned into (``int``, ``float``, ``str``, ``bool``).
        choices: the allowed values (empty: ``check`` alone decides).
        check: the rule a value breaks (``"is outside [0, 1)"``), or None when it is allowed.
        space_rule: how a space file's error states a value outside ``choices`` (default: "is not one of").
        order: sampling order among all per-layer fields (stable: the same seed gives the same trials).
        asked: given the layer's values sampled so far, whether the field is asked (else its default).
        report: shown as a column of the report's per-layer table.
        kinds: the inventory layer kinds the field applies to (:data:`LAYER_KINDS`); on a layer of another
            kind it is not asked and keeps its default (the matmul layers unless the technique says more:
            the weight-only bits of an embedding table).
        values_by_kind: ``(layer kind, values)`` pairs: the only values the field takes there (``quant_mode``: a conv is
            quantized statically; dynamic int8 is a Linear layer's); a search space offers no other value on
            that kind (:attr:`~autocompress.space.SearchSpace.allowed_by_kind`), so no trial and no
            applicability probe tries it.
    """

    name: str
    default: Any
    short: str = ""
    cast: Callable[[Any], Any] = str
    choices: tuple = ()
    check: Callable[[Any], str | None] | None = None
    space_rule: str = ""
    order: float = 1000.0
    asked: Callable[[dict[str, Any]], bool] | None = None
    report: bool = True
    kinds: tuple[str, ...] = MATMUL_KINDS
    values_by_kind: tuple[tuple[str, tuple], ...] = ()  # (kind, values) pairs: a frozen, hashable Dim

    @property
    def prefix(self) -> str:
        return self.short or self.name

    def applies(self, kind: str) -> bool:
        """Whether the field is a choice on an inventory layer of ``kind`` (``Linear``, ``Embedding``)."""
        return kind in self.kinds

    def rule(self, value: Any, space: bool = False) -> str | None:
        """What is wrong with ``value`` (a phrase after the value), None when it is allowed."""
        if self.choices and value not in self.choices:
            return f"{(space and self.space_rule) or 'is not one of'} {list(self.choices)}"
        return self.check(value) if self.check is not None else None

    def problem(self, value: Any, space: bool = False) -> str | None:
        """``"<value> <rule>"`` (a space file's message), None when ``value`` is allowed."""
        rule = self.rule(value, space)
        return None if rule is None else f"{_shown(value)} {rule}"


@dataclass(frozen=True)
class Probe:
    """One (technique, layer) check of the applicability pass: the layer at its harshest setting.

    Attributes:
        key: probes with equal keys are checked together (one compress for all their layers).
        technique: its name in the report (``low rank (ratio)``). dim / value: what leaves the layer's
            domain when the check fails. setting: the value tried, as shown (``rank_ratio 0.1``).
        layer: the per-layer plan fields of the check.
        coupled: layers that pass alone are tried together again (structured pruning).
        lowers: the result is lowered (masks keep the baseline's graph: no).
        skipped: fragments of a pipeline note that say the technique had no effect on the layer.
    """

    key: tuple
    technique: str
    dim: str
    value: Any
    setting: str
    layer: dict[str, Any]
    coupled: bool = False
    lowers: bool = True
    skipped: tuple[str, ...] = ()


@dataclass(frozen=True)
class TechniqueSpec:
    """A registered technique.

    Attributes:
        name: the registry name.
        dims: its per-layer fields.
        steps: ``(order, step)`` pairs; :func:`autocompress.pipeline.compress` runs every registered step
            in ascending order, each as ``step(build)`` on the pipeline's build state.
        check_layer: cross-field rules of one layer plan, ``(layer_plan, where) -> None`` raising ConfigError.
        check_space: cross-field rules of a search space, ``(space_model, source) -> None``.
        settings: plan-wide fields it reads, with their domains: ``name`` is the plan attribute (dotted
            into the schedule: ``schedule.kind``) and ``short`` the key in a space file.
        probes: ``(params, layer_info, allowed_by_kind) -> [Probe]``: the applicability checks of one
            layer, ``params`` being the layer's domains (field -> ``space.Param``).
        collapse: field -> ``(field, fixed value)``: when a failed check leaves a field no value, the
            domain switched off instead (no rank mode left: ``rank_ratio`` fixed at 1.0).
        size_floor: ``(params, layer_info, floor) -> None`` lowers ``floor`` (``elements``, ``keep``,
            ``fan_in``, ``bits``) to the least the layer can hold (the preflight's size bound).
        inapplicable: ``(model) -> {setting's space key: (values, why)}``: values of plan-wide settings that
            cannot apply to the model as a whole (feature KD on a model without encoder layers); the
            applicability check removes them from the settings' domains before the search.
        check_model: ``(space, model, source) -> None`` raising ConfigError (``model()`` builds the model): a space the model as a whole
            cannot use (linear attention on a model without attention), refused before the first trial.
    """

    name: str
    dims: tuple[Dim, ...] = ()
    settings: tuple[Dim, ...] = ()
    steps: tuple[tuple[float, Callable[[Any], None]], ...] = ()
    check_layer: Callable[[Any, str], None] | None = None
    check_space: Callable[[Any, str], None] | None = None
    probes: Callable[[dict, Any, dict], list[Probe]] | None = None
    collapse: dict[str, tuple[str, Any]] | None = None
    size_floor: Callable[[dict, Any, dict], None] | None = None
    inapplicable: Callable[[Any], dict[str, tuple[tuple, str]]] | None = None
    check_model: Callable[[Any, Any, Any], None] | None = None

    @property
    def order(self) -> float:
        """The technique's place in the pipeline: its first step's order."""
        return min((o for o, _ in self.steps), default=float("inf"))


class TechniqueRegistry(Registry[TechniqueSpec]):
    """The registry of techniques. The built-ins register themselves when ``autocompress.techniques`` is
    imported, which the package does first (``autocompress/__init__.py``): the registry imports no technique."""

    def __init__(self):
        super().__init__("technique")
        self.version = 0  # bumped at every change: schema caches rebuild

    def add(self, name: str, obj: TechniqueSpec) -> None:
        taken = {d.name: t.name for t in self._items.values() if t.name != name for d in t.dims}
        clash = [d.name for d in obj.dims if d.name in taken]
        if clash:
            raise ValueError(f"technique {name!r}: field {clash[0]!r} belongs to {taken[clash[0]]!r}")
        super().add(name, obj)
        self.version += 1

    def remove(self, name: str) -> None:
        """Unregister ``name`` (plug-ins and tests that register a technique for a while)."""
        self._items.pop(name, None)
        self.version += 1

    def specs(self) -> list[TechniqueSpec]:
        """The registered techniques, in pipeline order (a technique without steps last)."""
        return sorted(self._items.values(), key=lambda t: t.order)

    def dims(self) -> list[Dim]:
        """Every per-layer field, in sampling order."""
        return sorted((d for t in self.specs() for d in t.dims), key=lambda d: d.order)

    def dim(self, name: str) -> Dim:
        found = {d.name: d for d in self.dims()}
        if name not in found:
            close = difflib.get_close_matches(name, list(found), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown per-layer field {name!r}{hint}; known: {', '.join(found)}")
        return found[name]

    def settings(self) -> list[Dim]:
        """Every plan-wide field with a technique's domain."""
        return [d for t in self.specs() for d in t.settings]

    def steps(self) -> list[tuple[float, str, Callable[[Any], None]]]:
        """Every pipeline step ``(order, technique, step)``, in order."""
        return sorted(((o, t.name, s) for t in self.specs() for o, s in t.steps), key=lambda x: x[0])


TECHNIQUES = TechniqueRegistry()
