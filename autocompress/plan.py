"""Plan: the plain-data description of one compressed model (what a trial decided)."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, replace

from .errors import ConfigError
from .lowering import FLOAT_BITS  # noqa: F401 - re-exported: bits of a float layer
from .registry import TECHNIQUES

LR_SCHEDULES = ("constant", "cosine")  # Plan.lr_schedule


def _choices(name: str) -> tuple:
    """The allowed values of a registered per-layer field or plan-wide setting."""
    found = {d.name: d for d in [*TECHNIQUES.dims(), *TECHNIQUES.settings()]}
    return found[name].choices


def __getattr__(name: str):  # the domains live with their techniques: SUPPORTED_BITS, RANK_MODES, ...
    aliases = {
        "SUPPORTED_BITS": "bits",
        "SPARSITY_KINDS": "sparsity_kind",
        "RANK_MODES": "rank_mode",
        "GRANULARITIES": "quant_granularity",
        "SCHEMES": "quant_scheme",
        "QUANT_MODES": "quant_mode",
        "CALIBRATIONS": "calibration",
        "IMPORTANCES": "importance",
        "SCHEDULES": "schedule.kind",
    }
    if name in aliases:
        return _choices(aliases[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class LayerPlan:
    """Per-layer decisions: one value per field of every registered technique (see
    :data:`autocompress.registry.TECHNIQUES`); a field not given keeps its technique's default.

    Built-in fields: ``bits`` (32 float, 16 float16, 2 to 8 an integer grid), ``quant_scheme``
    (``symmetric``/``asymmetric``), ``quant_granularity`` (``channel``/``tensor``), ``quant_mode``
    (``static``, or ``dynamic`` for int8 Linear/LSTM/GRU: activations quantized at run time);
    ``sparsity`` and ``sparsity_kind`` (``unstructured`` masks, ``structured`` removes that fraction of
    output channels, ``2:4``); ``rank_ratio`` and ``rank_mode`` (``ratio``, ``energy``, ``spatial``,
    ``tucker``, ``cp``; see ``techniques.lowrank``). Immutable, hashable, compared by value.
    """

    __slots__ = ("_values",)

    def __init__(self, **values):
        dims = TECHNIQUES.dims()
        unknown = set(values) - {d.name for d in dims}
        if unknown:
            raise TypeError(
                f"LayerPlan got unknown field(s) {sorted(unknown)}; known: {[d.name for d in dims]}"
            )
        object.__setattr__(self, "_values", {d.name: values.get(d.name, d.default) for d in dims})

    def __getattr__(self, name: str):
        try:
            return object.__getattribute__(self, "_values")[name]
        except KeyError:
            raise AttributeError(f"LayerPlan has no field {name!r}") from None

    def __setattr__(self, name, value):
        raise AttributeError("LayerPlan is immutable: use .replace(...)")

    def __eq__(self, other) -> bool:
        return isinstance(other, LayerPlan) and self._values == other._values

    def __hash__(self) -> int:
        return hash(tuple(sorted(self._values.items())))

    def __repr__(self) -> str:
        return f"LayerPlan({', '.join(f'{k}={v!r}' for k, v in self._values.items())})"

    def __reduce__(self):
        return (_layer_plan, (self.to_dict(),))

    def to_dict(self) -> dict:
        return dict(self._values)

    def replace(self, **changes) -> LayerPlan:
        return LayerPlan(**{**self._values, **changes})

    def for_kind(self, kind: str) -> tuple[LayerPlan, list[str]]:
        """This plan on a layer of inventory ``kind``: the fields that do not apply there (see
        :attr:`~autocompress.registry.Dim.kinds`) back at their defaults, and the names of those that
        were set otherwise (an embedding table takes its bits only: no rank, sparsity or dynamic mode)."""
        dropped = [
            d.name for d in TECHNIQUES.dims() if not d.applies(kind) and self._values[d.name] != d.default
        ]
        if not dropped:
            return self, []
        return self.replace(**{d.name: d.default for d in TECHNIQUES.dims() if d.name in dropped}), dropped

    def validate(self, where: str) -> None:
        for d in TECHNIQUES.dims():
            v = self._values[d.name]
            rule = d.rule(v)
            if rule is not None:
                raise ConfigError(f"{d.name} {_shown(v)} {rule}", field=f"{where}.{d.name}")
        for spec in TECHNIQUES.specs():
            if spec.check_layer is not None:
                spec.check_layer(self, where)


def _layer_plan(values: dict) -> LayerPlan:
    return LayerPlan(**values)


def _shown(v) -> str:
    return repr(v) if isinstance(v, str) else str(v)


def _check_settings(plan) -> None:
    """Plan-wide fields with a technique's domain (``calibration``, ``importance``, ``schedule.kind``)."""
    for d in TECHNIQUES.settings():
        v = plan
        for part in d.name.split("."):
            v = getattr(v, part)
        rule = d.rule(v)
        if rule is not None:
            raise ConfigError(f"{d.name.rsplit('.', 1)[-1]} {_shown(v)} {rule}", field=d.name)


@dataclass(frozen=True)
class Schedule:
    """Sparsity schedule: how the per-layer final sparsity is reached during fine-tuning.

    ``start`` and ``end`` are fractions of the fine-tuning steps.
    """

    kind: str = "one_shot"
    start: float = 0.0
    end: float = 1.0
    steps: int = 0  # number of equal sparsity updates between start and end; 0 = every step

    def validate(self, where: str = "schedule") -> None:
        if self.steps < 0:
            raise ConfigError(f"steps {self.steps} must be >= 0", field=f"{where}.steps")
        if not (0.0 <= self.start <= self.end <= 1.0):
            raise ConfigError(
                f"need 0 <= start <= end <= 1, got start={self.start}, end={self.end}", field=where
            )


@dataclass(frozen=True)
class Plan:
    """Everything needed to rebuild a compressed model from the task's teacher.

    Attributes:
        layers: layer name -> :class:`LayerPlan` (layers absent keep the defaults).
        schedule: the sparsity schedule.
        kd_temperature: distillation temperature T (>= 1).
        kd_alpha: weight of the KD term; ``1 - kd_alpha`` weighs the hard-label loss.
        epochs: fine-tuning epochs (0 = post-training compression only).
        steps: fine-tuning optimizer steps; when set it decides the length instead of ``epochs``
            (0 = post-training compression only).
        lr: fine-tuning learning rate.
        lr_schedule: how the rate moves over the fine-tune: ``constant``, or ``cosine`` (from ``lr`` down
            to 0 at the last step, a half cosine over the steps). A constant plan's dict omits the field,
            so plans written before it existed keep their fingerprints.
        seed: seed of the fine-tuning run.
        importance: channel importance for structured pruning (``l1``, ``l2``, ``taylor``).
        hints: module names whose outputs are distilled (feature KD), with weight ``hint_weight``.
        kd_features: encoder distillation besides the logit loss (``none``, ``hidden``, ``attention``,
            ``hidden+attention``: per-block hidden-state MSE, attention-distribution KL; see
            :mod:`autocompress.techniques.encoder_kd`), weighed by ``kd_feature_weight``.
        calibration: activation ranges of 8-bit static layers: ``minmax`` or ``percentile`` (99.99th).
        lsq: learn the weight quantization step sizes during fine-tuning (LSQ) instead of min-max.
        reconstruct: after one-shot structured pruning, refit the Linear layers whose inputs got narrower
            by least squares to the teacher's outputs (:mod:`autocompress.techniques.reconstruct`).
    """

    layers: dict[str, LayerPlan] = field(default_factory=dict)
    schedule: Schedule = Schedule()
    kd_temperature: float = 4.0
    kd_alpha: float = 0.5
    epochs: int = 3
    steps: int | None = None
    lr: float = 1e-3
    lr_schedule: str = "constant"
    seed: int = 0
    importance: str = "l1"
    hints: tuple[str, ...] = ()
    hint_weight: float = 0.0
    kd_features: str = "none"
    kd_feature_weight: float = 1.0
    calibration: str = "minmax"
    lsq: bool = False
    reconstruct: bool = False

    def __post_init__(self) -> None:
        for name, lp in self.layers.items():
            lp.validate(f"layers.{name}")
        self.schedule.validate()
        _check_settings(self)
        if not (self.kd_temperature >= 1.0):
            raise ConfigError(f"kd_temperature {self.kd_temperature} must be >= 1", field="kd_temperature")
        if not (0.0 <= self.kd_alpha <= 1.0):
            raise ConfigError(f"kd_alpha {self.kd_alpha} is outside [0, 1]", field="kd_alpha")
        if self.hint_weight < 0:
            raise ConfigError(f"hint_weight {self.hint_weight} must be >= 0", field="hint_weight")
        if not (self.kd_feature_weight >= 0):
            raise ConfigError(
                f"kd_feature_weight {self.kd_feature_weight} must be >= 0", field="kd_feature_weight"
            )
        if self.steps is not None and self.steps < 0:
            raise ConfigError(f"steps {self.steps} must be >= 0", field="steps")
        if self.epochs < 0:
            raise ConfigError(f"epochs {self.epochs} must be >= 0", field="epochs")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(
                f"lr_schedule {self.lr_schedule!r} is not one of {', '.join(LR_SCHEDULES)}",
                field="lr_schedule",
            )
        if not isinstance(self.lsq, bool):
            raise ConfigError(f"lsq {self.lsq!r} must be true or false", field="lsq")

    def layer(self, name: str) -> LayerPlan:
        return self.layers.get(name, LayerPlan())

    def to_dict(self) -> dict:
        d = asdict(replace(self, layers={}))
        if d["lr_schedule"] == "constant":
            del d["lr_schedule"]
        d["layers"] = {k: v.to_dict() for k, v in sorted(self.layers.items())}
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        d = dict(d)
        layers = {k: LayerPlan(**v) for k, v in d.pop("layers", {}).items()}
        schedule = Schedule(**d.pop("schedule", {}))
        return cls(layers=layers, schedule=schedule, hints=tuple(d.pop("hints", ())), **d)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        return cls.from_dict(json.loads(text))

    def lr_at(self, progress: float) -> float:
        """The fine-tuning rate at ``progress`` (0 to 1) of the fine-tune (see ``lr_schedule``)."""
        if self.lr_schedule == "cosine":
            return self.lr * 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
        return self.lr

    def fingerprint(self) -> str:
        """Hash of the whole plan (same plan = same compressed model, given the same teacher)."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    def structure(self) -> dict[str, tuple]:
        """Per-layer (bits, rank_ratio, structured ratio): what determines the artifact's graph and dtypes."""
        return {
            k: (v.bits, v.rank_ratio, v.sparsity if v.sparsity_kind == "structured" else 0.0)
            for k, v in sorted(self.layers.items())
        }
