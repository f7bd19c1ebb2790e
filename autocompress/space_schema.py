"""The schema of a search-space file (pydantic): the plan-wide part (schedule, KD, quantization,
grouping) and :func:`space_model`, which adds every registered per-layer field. :mod:`.space` reads
files through it and re-exports these names."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, create_model

from .domain import Param
from .registry import TECHNIQUES


class ScheduleSpace(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    kind: Param = Param(fixed="one_shot")
    start: Param = Param(fixed=0.0)
    end: Param = Param(fixed=1.0)
    steps: Param = Param(fixed=0)


class KDSpace(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    temperature: Param = Param(fixed=4.0)
    alpha: Param = Param(fixed=0.5)
    hints: list[str] = []  # module names for feature KD (outputs matched through an adapter)
    hint_weight: Param = Param(fixed=0.0)
    # encoder distillation besides the logit loss: none | hidden | attention | hidden+attention
    features: Param = Param(fixed="none")
    feature_weight: Param = Param(fixed=1.0)


class QuantSpace(BaseModel):
    """Plan-level quantization choices: activation calibration of 8-bit static layers, LSQ step sizes."""

    model_config = ConfigDict(extra="forbid", strict=True)

    calibration: Param = Param(fixed="minmax")
    lsq: Param = Param(fixed=False)


class _SpaceBase(BaseModel):
    """The plan-wide part of a search space file; the per-layer fields come from the registry."""

    model_config = ConfigDict(extra="forbid", strict=True)

    quant: QuantSpace = QuantSpace()
    importance: Param = Param(fixed="l1")
    # after one-shot structured pruning: refit the layers reading pruned channels (least squares)
    reconstruct: Param = Param(fixed=False)
    schedule: ScheduleSpace = ScheduleSpace()
    kd: KDSpace = KDSpace()
    # "layer": one parameter per layer; "global": one per dimension for the whole model;
    # {group name: regex}: layers matching a group (first match wins) share that group's parameters
    groups: Literal["layer", "global"] | dict[str, str] = "layer"


_MODELS: dict[int, type[BaseModel]] = {}


def space_model() -> type[BaseModel]:
    """The schema of a search space file: every registered per-layer field (a :class:`Param`, at the top
    for all layers and under ``layers.<regex>`` for some), plus the plan-wide part."""
    version = TECHNIQUES.version
    if version not in _MODELS:
        dims = TECHNIQUES.dims()
        config = ConfigDict(extra="forbid", strict=True)
        layer = create_model("LayerSpace", __config__=config, **{d.name: (Param | None, None) for d in dims})
        top = {d.name: (Param, Param(fixed=d.default)) for d in dims}
        _MODELS.clear()
        _MODELS[version] = create_model(
            "SpaceModel", __base__=_SpaceBase, layers=(dict[str, layer], {}), **top
        )
    return _MODELS[version]
