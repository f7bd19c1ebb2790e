"""Optuna samplers by name (we do not re-implement any)."""

from __future__ import annotations

import optuna

from ..errors import ConfigError
from ..registry import Registry

SAMPLERS: Registry = Registry("sampler")
SAMPLERS.add("tpe", optuna.samplers.TPESampler)
SAMPLERS.add("nsga2", optuna.samplers.NSGAIISampler)
SAMPLERS.add("random", optuna.samplers.RandomSampler)
SAMPLERS.add("gp", optuna.samplers.GPSampler)


def make_sampler(name: str, seed: int, options: dict) -> optuna.samplers.BaseSampler:
    cls = SAMPLERS.get(name)
    try:
        return cls(seed=seed, **options)
    except TypeError as exc:
        raise ConfigError(f"bad option for sampler {name!r}: {exc}", field="sampler.options") from None
