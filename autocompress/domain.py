"""One dimension of a search space: a fixed value, categorical choices or a range (Optuna suggestions)."""

from __future__ import annotations

import optuna
from pydantic import BaseModel, ConfigDict, model_validator


class Param(BaseModel):
    """One dimension: ``{fixed: v}``, ``{choices: [...]}`` or ``{low, high, step?, log?}``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    fixed: bool | float | int | str | None = None
    choices: list[bool | float | int | str] | None = None
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False

    @model_validator(mode="after")
    def _one_form(self) -> Param:
        forms = [
            self.fixed is not None,
            self.choices is not None,
            self.low is not None or self.high is not None,
        ]
        if sum(forms) != 1:
            raise ValueError("give exactly one of 'fixed', 'choices', or 'low'+'high'")
        if self.choices is not None and not self.choices:
            raise ValueError("'choices' must not be empty")
        if forms[2]:
            if self.low is None or self.high is None:
                raise ValueError("a range needs both 'low' and 'high'")
            if self.low > self.high:
                raise ValueError(f"low {self.low} > high {self.high}")
            if self.log and self.low <= 0:
                raise ValueError("a log range needs low > 0")
            if self.log and self.step is not None:
                raise ValueError("'step' cannot be combined with 'log'")
        return self

    def values(self) -> list:
        """The values this dimension can take (a range gives its two ends)."""
        if self.fixed is not None:
            return [self.fixed]
        if self.choices is not None:
            return list(self.choices)
        return [self.low, self.high]

    def suggest(self, trial: optuna.Trial, name: str):
        if self.fixed is not None:
            return self.fixed
        if self.choices is not None:
            return trial.suggest_categorical(name, self.choices)
        return trial.suggest_float(name, self.low, self.high, step=self.step, log=self.log)


def deep_merge(base: dict, over: dict) -> dict:
    """Recursive dict merge; a Param given in ``over`` replaces the base Param whole."""
    out = dict(base)
    for k, v in over.items():
        is_param = isinstance(v, dict) and {"fixed", "choices", "low", "high"} & set(v)
        if isinstance(v, dict) and isinstance(out.get(k), dict) and not is_param:
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out
