"""Plan: the plain-data description of one compressed model (what a trial decided)."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field

from .errors import ConfigError
from .techniques.lowrank import RANK_MODES
from .techniques.quantize import CALIBRATIONS, GRANULARITIES, QUANT_MODES, SCHEMES
from .techniques.schedules import SCHEDULES

FLOAT_BITS = 32
SUPPORTED_BITS = (2, 3, 4, 5, 6, 8, 16, FLOAT_BITS)  # 16 = float16; 32 = float
SPARSITY_KINDS = ("unstructured", "structured", "2:4")
IMPORTANCES = ("l1", "l2", "taylor")


@dataclass(frozen=True)
class LayerPlan:
    """Per-layer decisions. ``bits=32`` is float, ``rank_ratio=1`` is not factorized.

    ``sparsity_kind``: ``unstructured`` (masks: the fraction ``sparsity`` of weights is zero),
    ``structured`` (the fraction ``sparsity`` of output channels is removed: the layer gets smaller)
    or ``2:4`` (two of every four consecutive input weights are zero; ``sparsity`` is ignored).
    ``rank_mode``: how ``rank_ratio`` factorizes the layer (see ``techniques.lowrank``): ``ratio``,
    ``energy``, ``spatial``, ``tucker`` or ``cp``.
    ``quant_granularity`` (``channel``/``tensor``) and ``quant_scheme`` (``symmetric``/``asymmetric``)
    shape the weight grid of 2- to 8-bit layers; ``quant_mode`` ``dynamic`` (8 bits only) quantizes the
    activations at run time instead of calibrating them (Linear, LSTM and GRU layers).
    """

    bits: int = FLOAT_BITS
    sparsity: float = 0.0
    rank_ratio: float = 1.0
    sparsity_kind: str = "unstructured"
    rank_mode: str = "ratio"
    quant_granularity: str = "channel"
    quant_scheme: str = "symmetric"
    quant_mode: str = "static"

    def validate(self, where: str) -> None:
        for name, allowed in (
            ("quant_granularity", GRANULARITIES),
            ("quant_scheme", SCHEMES),
            ("quant_mode", QUANT_MODES),
        ):
            if getattr(self, name) not in allowed:
                raise ConfigError(
                    f"{name} {getattr(self, name)!r} is not one of {list(allowed)}", field=f"{where}.{name}"
                )
        if self.quant_mode == "dynamic" and self.bits != 8:
            raise ConfigError(
                f"quant_mode 'dynamic' needs bits 8 (int8 weights), got bits {self.bits}",
                field=f"{where}.quant_mode",
            )
        if self.bits not in SUPPORTED_BITS:
            raise ConfigError(f"bits {self.bits} is not one of {list(SUPPORTED_BITS)}", field=f"{where}.bits")
        if not (0.0 <= self.sparsity < 1.0) or math.isnan(self.sparsity):
            raise ConfigError(f"sparsity {self.sparsity} is outside [0, 1)", field=f"{where}.sparsity")
        if not (0.0 < self.rank_ratio <= 1.0):
            raise ConfigError(f"rank_ratio {self.rank_ratio} is outside (0, 1]", field=f"{where}.rank_ratio")
        if self.rank_mode not in RANK_MODES:
            raise ConfigError(
                f"rank_mode {self.rank_mode!r} is not one of {list(RANK_MODES)}", field=f"{where}.rank_mode"
            )
        if self.sparsity_kind not in SPARSITY_KINDS:
            raise ConfigError(
                f"sparsity_kind {self.sparsity_kind!r} is not one of {list(SPARSITY_KINDS)}",
                field=f"{where}.sparsity_kind",
            )


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
        if self.kind not in SCHEDULES:
            raise ConfigError(f"kind {self.kind!r} is not one of {list(SCHEDULES)}", field=f"{where}.kind")
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
        seed: seed of the fine-tuning run.
        importance: channel importance for structured pruning (``l1``, ``l2``, ``taylor``).
        hints: module names whose outputs are distilled (feature KD), with weight ``hint_weight``.
        calibration: activation ranges of 8-bit static layers: ``minmax`` or ``percentile`` (99.99th).
        lsq: learn the weight quantization step sizes during fine-tuning (LSQ) instead of min-max.
    """

    layers: dict[str, LayerPlan] = field(default_factory=dict)
    schedule: Schedule = Schedule()
    kd_temperature: float = 4.0
    kd_alpha: float = 0.5
    epochs: int = 3
    steps: int | None = None
    lr: float = 1e-3
    seed: int = 0
    importance: str = "l1"
    hints: tuple[str, ...] = ()
    hint_weight: float = 0.0
    calibration: str = "minmax"
    lsq: bool = False

    def __post_init__(self) -> None:
        for name, lp in self.layers.items():
            lp.validate(f"layers.{name}")
        self.schedule.validate()
        if not (self.kd_temperature >= 1.0):
            raise ConfigError(f"kd_temperature {self.kd_temperature} must be >= 1", field="kd_temperature")
        if not (0.0 <= self.kd_alpha <= 1.0):
            raise ConfigError(f"kd_alpha {self.kd_alpha} is outside [0, 1]", field="kd_alpha")
        if self.importance not in IMPORTANCES:
            raise ConfigError(
                f"importance {self.importance!r} is not one of {list(IMPORTANCES)}", field="importance"
            )
        if self.hint_weight < 0:
            raise ConfigError(f"hint_weight {self.hint_weight} must be >= 0", field="hint_weight")
        if self.steps is not None and self.steps < 0:
            raise ConfigError(f"steps {self.steps} must be >= 0", field="steps")
        if self.epochs < 0:
            raise ConfigError(f"epochs {self.epochs} must be >= 0", field="epochs")
        if self.calibration not in CALIBRATIONS:
            raise ConfigError(
                f"calibration {self.calibration!r} is not one of {list(CALIBRATIONS)}", field="calibration"
            )
        if not isinstance(self.lsq, bool):
            raise ConfigError(f"lsq {self.lsq!r} must be true or false", field="lsq")

    def layer(self, name: str) -> LayerPlan:
        return self.layers.get(name, LayerPlan())

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layers"] = {k: asdict(v) for k, v in sorted(self.layers.items())}
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

    def fingerprint(self) -> str:
        """Hash of the whole plan (same plan = same compressed model, given the same teacher)."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    def structure(self) -> dict[str, tuple]:
        """Per-layer (bits, rank_ratio, structured ratio): what determines the artifact's graph and dtypes."""
        return {
            k: (v.bits, v.rank_ratio, v.sparsity if v.sparsity_kind == "structured" else 0.0)
            for k, v in sorted(self.layers.items())
        }
