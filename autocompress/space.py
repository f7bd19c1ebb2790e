"""Search space: YAML file + per-study overrides + inventory -> Optuna suggestions -> Plan.

No computation happens here: a space only turns trial suggestions into a :class:`Plan`.

The per-layer dimensions are the fields of the registered techniques
(:data:`~autocompress.registry.TECHNIQUES`), asked per layer in their registered sampling order.
Parameter names are stable dotted paths (resumed studies depend on them): ``<field prefix>.<layer or
group>``; built-in ``bits.<layer>``, ``sparsity.<layer>``, ``rank.<layer>``, ``schedule.kind``,
``schedule.start``, ``schedule.end``, ``kd.temperature``, ``kd.alpha``, ``kd.features``,
``kd.feature_weight``; quantization grids
``qscheme.<layer>``, ``qgranularity.<layer>`` (asked only where ``bits`` is 2 to 8), ``qmode.<layer>``
(only where ``bits`` is 8: dynamic needs int8 weights), and plan-level ``quant.calibration``,
``quant.lsq``. A field is asked only on the layer kinds it applies to
(:attr:`~autocompress.registry.Dim.kinds`): an embedding table is asked ``bits.<layer>`` and its grid,
nothing else, and only where the backend stores tables below float (``allowed_by_kind``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import optuna
import yaml
from pydantic import BaseModel, ValidationError

from .domain import Param, deep_merge  # noqa: F401 - re-exported
from .errors import ConfigError
from .inventory import LayerInfo
from .plan import LayerPlan, Plan, Schedule
from .registry import TECHNIQUES
from .space_schema import KDSpace, QuantSpace, ScheduleSpace, space_model  # noqa: F401 - re-exported


def __getattr__(name: str):  # the per-layer fields come from the technique registry
    if name == "PER_LAYER":
        return tuple(d.name for d in TECHNIQUES.dims())
    if name == "SHORT":
        return {d.name: d.prefix for d in TECHNIQUES.dims()}
    if name == "SpaceModel":
        return space_model()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class SearchSpace:
    """A validated search space, ready to expand over an inventory."""

    def __init__(self, model: BaseModel, source: str = "<space>"):
        self.model = model
        self.source = source
        self._check_values()
        # Optuna parameter name -> a narrower domain (sensitivity narrowing, fixed when the study is made)
        self.narrowed: dict[str, Param] = {}
        # per-layer field -> layer kind -> the values the backend runs (e.g. ascend: Linear weight grids
        # per tensor only); a kind with one value is not asked, others within the values allowed. Seeded
        # with the techniques' own rules (Dim.values_by_kind: a conv's int8 is static)
        self.allowed_by_kind: dict[str, dict[str, tuple]] = {
            d.name: dict(d.values_by_kind) for d in TECHNIQUES.dims() if d.values_by_kind
        }

    @property
    def granularity_by_kind(self) -> dict[str, tuple[str, ...]]:
        """Layer kind -> the weight grids the backend runs (``quant_granularity`` of ``allowed_by_kind``)."""
        return self.allowed_by_kind.get("quant_granularity", {})

    @granularity_by_kind.setter
    def granularity_by_kind(self, value: dict[str, tuple[str, ...]]) -> None:
        self.allowed_by_kind["quant_granularity"] = dict(value)

    def narrow(self, domains: dict[str, dict]) -> None:
        """Replace the domains of the named Optuna parameters (e.g. ``bits.conv1``) by narrower ones."""
        self.narrowed = {name: Param.model_validate(d) for name, d in domains.items()}

    @classmethod
    def from_dict(cls, data: dict, source: str = "<space>") -> SearchSpace:
        from .validation_errors import format_validation_error

        schema = space_model()
        try:
            return cls(schema.model_validate(data), source)
        except ValidationError as exc:
            field, rule = format_validation_error(exc, schema)
            raise ConfigError(rule, source=source, field=field) from None

    @classmethod
    def from_file(
        cls, path: str | Path, overrides: dict | None = None, overrides_source: str = ""
    ) -> SearchSpace:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(
                f"search space file {str(path)!r} does not exist", source=overrides_source, field="space.file"
            ) from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"not valid YAML: {str(exc).splitlines()[0]}", source=str(path)) from None
        if not isinstance(data, dict):
            raise ConfigError("a search space file must be a mapping", source=str(path))
        source = str(path)
        if overrides:
            data = deep_merge(data, overrides)
            source = f"{path} (+ overrides in {overrides_source})" if overrides_source else source
        return cls.from_dict(data, source)

    def _check_values(self) -> None:
        m, dims = self.model, TECHNIQUES.dims()
        checks = [(d.name, d, getattr(m, d.name)) for d in dims]
        for pattern, ls in m.layers.items():
            self._regex(pattern, f"layers.{pattern}")
            checks += [(f"layers.{pattern}.{d.name}", d, getattr(ls, d.name)) for d in dims]
        for field, dim, param in checks:
            for v in param.values() if param is not None else ():
                problem = dim.problem(v, space=True)
                if problem is not None:
                    raise ConfigError(problem, source=self.source, field=field)
        if isinstance(m.groups, dict):
            for group, pattern in m.groups.items():
                self._regex(pattern, f"groups.{group}")
        for spec in TECHNIQUES.specs():
            if spec.check_space is not None:
                spec.check_space(m, self.source)
        for setting in TECHNIQUES.settings():
            field = setting.short or setting.name
            param = m
            for part in field.split("."):
                param = getattr(param, part)
            for v in param.values():
                problem = setting.problem(v, space=True)
                if problem is not None:
                    raise ConfigError(problem, source=self.source, field=field)
        if any(not isinstance(v, bool) for v in m.quant.lsq.values()):
            raise ConfigError("values must be true or false", source=self.source, field="quant.lsq")
        for field, p in (
            ("schedule.start", m.schedule.start),
            ("schedule.end", m.schedule.end),
            ("kd.alpha", m.kd.alpha),
        ):
            if any(not (isinstance(v, int | float) and 0 <= v <= 1) for v in p.values()):
                raise ConfigError("values must lie in [0, 1]", source=self.source, field=field)
        if any(not (isinstance(v, int | float) and v >= 1) for v in m.kd.temperature.values()):
            raise ConfigError("values must be >= 1", source=self.source, field="kd.temperature")
        if any(not (isinstance(v, int | float) and v >= 0) for v in m.kd.feature_weight.values()):
            raise ConfigError("values must be >= 0", source=self.source, field="kd.feature_weight")

    def _regex(self, pattern: str, field: str) -> None:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ConfigError(f"invalid regex: {exc}", source=self.source, field=field) from None

    def bit_widths(self) -> set[int]:
        """Every bit width this space can produce (for checking against a backend)."""
        bits = set(self.model.bits.values())
        for ls in self.model.layers.values():
            if ls.bits is not None:
                bits |= set(ls.bits.values())
        return {int(b) for b in bits}

    def layer_domains(self, name: str) -> dict[str, Param]:
        """The domains of the layer named ``name`` as the space file (and any narrowing) gives them,
        before the per-kind rules of :meth:`layer_params`."""
        return self._layer_params(name)

    def _layer_params(self, name: str) -> dict[str, Param]:
        dims = TECHNIQUES.dims()
        params = {d.name: getattr(self.model, d.name) for d in dims}
        for pattern, ls in self.model.layers.items():  # later patterns win
            if re.fullmatch(pattern, name):
                params.update({k: getattr(ls, k) for k in params if getattr(ls, k) is not None})
        if self.narrowed:
            group = self.group_of(name)
            params = {d.name: self.narrowed.get(f"{d.prefix}.{group}", params[d.name]) for d in dims}
        return params

    def plan_param(self, key: str) -> Param:
        """The domain of a plan-wide dimension by its space key (``kd.features``), narrowed if it was."""
        if key in self.narrowed:
            return self.narrowed[key]
        p = self.model
        for part in key.split("."):
            p = getattr(p, part)
        return p

    def layer_params(self, info: LayerInfo) -> dict[str, Param]:
        """The domains of one inventory layer as the search sees it: a field that does not apply to the
        layer's kind (:attr:`~autocompress.registry.Dim.kinds`: an embedding table takes its bits only)
        is fixed at its default, and a categorical field keeps only the values the backend runs on that
        kind (:attr:`allowed_by_kind`; none of them offered: the backend's first)."""
        params = self._layer_params(info.name)
        for d in TECHNIQUES.dims():
            p = params[d.name]
            allowed = self.allowed_by_kind.get(d.name, {}).get(info.kind)
            if not d.applies(info.kind):
                params[d.name] = Param(fixed=d.default)
            elif allowed is not None and p.low is None:
                kept = [v for v in p.values() if v in allowed] or [allowed[0]]
                params[d.name] = Param(fixed=kept[0]) if len(kept) == 1 else Param(choices=kept)
        return params

    def group_of(self, layer: str) -> str:
        """The key that names a layer's parameters: the layer, its group, or ``all``."""
        groups = self.model.groups
        if groups == "global":
            return "all"
        if isinstance(groups, dict):
            for group, pattern in groups.items():
                if re.fullmatch(pattern, layer):
                    return group
        return layer

    def suggest(
        self,
        trial: optuna.Trial,
        inventory: list[LayerInfo],
        *,
        epochs: int,
        lr: float,
        seed: int,
        steps: int | None = None,
    ) -> Plan:
        """Ask ``trial`` for every dimension and return the Plan (grouped layers share values).

        Per layer, the registered fields are asked in their sampling order, then the plan-wide ones.
        """
        domains: dict[str, tuple[str, Param]] = {}
        layers = {info.name: self._suggest_layer(trial, info, domains) for info in inventory}
        return self._suggest_plan(trial, layers, epochs=epochs, lr=lr, seed=seed, steps=steps)

    def _suggest_layer(self, trial: optuna.Trial, info: LayerInfo, domains: dict) -> LayerPlan:
        params = self._layer_params(info.name)
        values: dict[str, Any] = {}
        for d in TECHNIQUES.dims():
            if not d.applies(info.kind):  # e.g. rank or sparsity of an embedding table: not a choice
                values[d.name] = d.default
                continue
            p, name = params[d.name], f"{d.prefix}.{self.group_of(info.name)}"
            first = domains.setdefault(name, (info.name, p))
            if first[1] != p:
                raise ConfigError(
                    f"layers {first[0]!r} and {info.name!r} share {name!r} but have different domains",
                    source=self.source,
                    field="groups",
                )
            if d.asked is not None and not d.asked(values):  # e.g. no integer grid on a float layer
                values[d.name] = d.default
                continue
            allowed = self.allowed_by_kind.get(d.name, {}).get(info.kind)
            if allowed is not None:
                kept = [v for v in p.values() if v in allowed]
                if len(kept) < 2:  # the backend runs one value here (or none the space offers)
                    values[d.name] = kept[0] if kept else allowed[0]
                    continue
                p = Param(choices=kept) if len(kept) < len(p.values()) else p
            values[d.name] = p.suggest(trial, name)
        return LayerPlan(**{d.name: d.cast(values[d.name]) for d in TECHNIQUES.dims()})

    def _suggest_plan(self, trial, layers, *, epochs, lr, seed, steps) -> Plan:
        s = self.model.schedule
        start = float(s.start.suggest(trial, "schedule.start"))
        end = max(start, float(s.end.suggest(trial, "schedule.end")))
        schedule = Schedule(
            kind=str(s.kind.suggest(trial, "schedule.kind")),
            start=start,
            end=end,
            steps=int(s.steps.suggest(trial, "schedule.steps")),
        )
        return Plan(
            layers=layers,
            schedule=schedule,
            kd_temperature=float(self.model.kd.temperature.suggest(trial, "kd.temperature")),
            kd_alpha=float(self.model.kd.alpha.suggest(trial, "kd.alpha")),
            epochs=epochs,
            steps=steps,
            lr=lr,
            seed=seed,
            importance=str(self.model.importance.suggest(trial, "prune.importance")),
            reconstruct=bool(self.model.reconstruct.suggest(trial, "prune.reconstruct")),
            hints=tuple(self.model.kd.hints),
            hint_weight=float(self.model.kd.hint_weight.suggest(trial, "kd.hint_weight")),
            kd_features=str(self.plan_param("kd.features").suggest(trial, "kd.features")),
            kd_feature_weight=float(self.model.kd.feature_weight.suggest(trial, "kd.feature_weight")),
            calibration=str(self.model.quant.calibration.suggest(trial, "quant.calibration")),
            lsq=bool(self.model.quant.lsq.suggest(trial, "quant.lsq")),
        )

    def plan_from_params(
        self,
        inventory: list[LayerInfo],
        params: dict[str, Any],
        *,
        epochs: int,
        lr: float,
        seed: int,
        steps: int | None = None,
    ) -> Plan:
        """The Plan of the Optuna values ``params`` without a trial: a dimension ``params`` leaves out (or
        gives a value outside its domain) takes its domain's first choice or the low end of its range.
        Nothing is recorded in a study (a study's first trials run such plans before the applicability
        check narrows the domains: Optuna refuses other choices for a parameter once a trial holds it)."""
        return self.suggest(_Given(params), inventory, epochs=epochs, lr=lr, seed=seed, steps=steps)

    def params_for(self, inventory: list[LayerInfo], **uniform: Any) -> dict[str, Any]:
        """Optuna parameter values of a uniform plan, for ``study.enqueue_trial`` (warm starts).

        ``uniform``: registered per-layer fields and their value for every layer (None: not set); a field
        not given is left to the sampler, except fields without choices (``sparsity``, ``rank_ratio``),
        which keep their technique's default (no compression). Only dimensions that are searched (not
        fixed) and that admit the value are included.
        """
        for name in uniform:
            TECHNIQUES.dim(name)  # an unknown field is an error that names the known ones
        wanted = {d.name: d.default for d in TECHNIQUES.dims() if not d.choices}
        wanted = {k: v for k, v in {**wanted, **uniform}.items() if v is not None}
        return self.params_from_layers(inventory, {info.name: wanted for info in inventory})

    def plan_params(self, **values: Any) -> dict[str, Any]:
        """Optuna values of plan-wide dimensions (``schedule_kind``, ``schedule_start``,
        ``schedule_end``, ``kd_temperature``, ``kd_alpha``) for a warm start; absent, fixed or
        inadmissible values are left to the sampler."""
        m = self.model
        dims = {
            "schedule_kind": ("schedule.kind", m.schedule.kind),
            "schedule_start": ("schedule.start", m.schedule.start),
            "schedule_end": ("schedule.end", m.schedule.end),
            "kd_temperature": ("kd.temperature", m.kd.temperature),
            "kd_alpha": ("kd.alpha", m.kd.alpha),
        }
        out: dict[str, Any] = {}
        for key, v in values.items():
            name, p = dims[key]
            if v is None or p.fixed is not None:
                continue
            if p.choices is not None:
                if v in p.choices:
                    out[name] = v
            elif p.low <= float(v) <= p.high:
                out[name] = float(v)
        return out

    def params_from_layers(
        self, inventory: list[LayerInfo], values: dict[str, dict[str, Any]]
    ) -> dict[str, Any]:
        """Optuna parameter values for per-layer ``values`` ({layer: {dimension: value}}).

        Values outside a searched range are clipped into it and snapped to its step; values not among
        a dimension's choices, and fixed dimensions, are left out (the sampler decides them).
        """
        out: dict[str, Any] = {}
        for info in inventory:
            for k, p in self._layer_params(info.name).items():
                v = values.get(info.name, {}).get(k)
                if v is None or p.fixed is not None or not TECHNIQUES.dim(k).applies(info.kind):
                    continue
                allowed = self.allowed_by_kind.get(k, {}).get(info.kind)
                if allowed is not None and (v not in allowed or sum(x in allowed for x in p.values()) < 2):
                    continue  # the backend runs one value there: the dimension is not asked
                if p.choices is not None:
                    if v not in p.choices:
                        continue
                else:
                    v = min(max(float(v), p.low), p.high)
                    if p.step:  # on the step's grid, without float noise past the range's end
                        v = min(round(p.low + round((v - p.low) / p.step) * p.step, 12), p.high)
                out.setdefault(f"{TECHNIQUES.dim(k).prefix}.{self.group_of(info.name)}", v)
        return out


class _Given:
    """Stands in for an Optuna trial in :meth:`SearchSpace.plan_from_params`: the given values, else
    each domain's first value."""

    def __init__(self, params: dict[str, Any]):
        self.params = params

    def suggest_categorical(self, name: str, choices: list) -> Any:
        v = self.params.get(name)
        return v if v is not None and v in choices else choices[0]

    def suggest_float(self, name: str, low: float, high: float, *, step=None, log: bool = False) -> float:
        v = self.params.get(name)
        return low if v is None else min(max(float(v), low), high)
