"""Metrics: a name, a direction and an accumulator over batches of (outputs, targets).

Every evaluation streams batches: ``state = metric.start()``, ``metric.update(state, outputs, targets,
reference)`` per batch, ``metric.result(state)`` at the end. ``outputs`` are the artifact's outputs
(numpy), ``targets`` the batch's targets (None when the task has none) and ``reference`` the teacher's
outputs on the same batch (only for metrics that compare to the teacher, such as :func:`fidelity`).

A user metric is any callable ``fn(outputs, targets) -> float`` wrapped by :class:`Metric` (or passed
as is: higher is better, the batch values averaged weighted by batch size).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import ConfigError


@dataclass(frozen=True)
class Metric:
    """A named metric.

    Attributes:
        name: shown in reports and progress lines (``accuracy``, ``fidelity``, ``mse``, ...).
        fn: ``fn(outputs, targets) -> float`` for one batch (or ``fn(outputs, targets, reference)``
            with ``needs_reference``), or None for the built-ins that keep their own sums.
        higher_is_better: the direction of the metric (budgets are stated as a drop in this direction).
        needs_targets: the metric compares to the data's targets (the task must provide them).
        needs_reference: the metric compares to the teacher's outputs on the same batch.
        reduce: ``mean`` (batch values averaged, weighted by batch size) or ``all`` (``fn`` called once
            over the concatenated outputs and targets: for metrics that do not average, at the cost
            of holding every output).
    """

    name: str
    fn: Callable[..., float] | None = None
    higher_is_better: bool = True
    needs_targets: bool = True
    needs_reference: bool = False
    reduce: str = "mean"
    kind: str = "callable"  # built-ins: accuracy, topk, f1, mse, mae, fidelity
    k: int = 1

    @property
    def sign(self) -> int:
        """+1 when higher is better, -1 when lower is better."""
        return 1 if self.higher_is_better else -1

    # -- accumulation ---------------------------------------------------------------------------
    def start(self) -> dict[str, Any]:
        return {"sum": 0.0, "n": 0, "outs": [], "tgts": [], "confusion": None}

    def update(self, state: dict, outputs: np.ndarray, targets: np.ndarray | None, reference=None) -> None:
        outputs = np.asarray(outputs)
        if not np.all(np.isfinite(outputs)):
            raise ValueError("the outputs are not finite")
        n = len(outputs)
        if self.needs_targets and targets is None:
            raise ConfigError(f"metric {self.name!r} needs targets; the task's `targets` adapter gives none")
        if self.kind in ("accuracy", "topk", "f1"):
            targets = class_indices(self.name, targets, n)
        if self.kind == "f1":
            _confusion_update(state, outputs, targets)
            return
        if self.kind == "callable" and self.reduce == "all":
            state["outs"].append(outputs)
            state["tgts"].append(None if targets is None else np.asarray(targets))
            return
        value = self._batch_value(outputs, targets, reference)
        state["sum"] += value * n
        state["n"] += n

    def result(self, state: dict) -> float:
        if self.kind == "f1":
            return _macro_f1(state["confusion"])
        if self.kind == "callable" and self.reduce == "all":
            if not state["outs"]:
                raise ConfigError(f"metric {self.name!r}: the evaluation data yielded no batch")
            tg = state["tgts"]
            targets = None if tg[0] is None else np.concatenate(tg)
            return _checked(self.name, self.fn(np.concatenate(state["outs"]), targets))
        if state["n"] == 0:
            raise ConfigError(f"metric {self.name!r}: the evaluation data yielded no batch")
        return state["sum"] / state["n"]

    def _batch_value(self, outputs: np.ndarray, targets, reference) -> float:
        if self.kind == "accuracy":
            return float((outputs.reshape(len(outputs), -1).argmax(axis=1) == targets).mean())
        if self.kind == "topk":
            top = np.argsort(-outputs.reshape(len(outputs), -1), axis=1)[:, : self.k]
            return float((top == targets.reshape(-1, 1)).any(axis=1).mean())
        if self.kind in ("mse", "mae"):
            diff = outputs.reshape(np.asarray(targets).shape) - np.asarray(targets)
            return float(np.mean(diff**2) if self.kind == "mse" else np.mean(np.abs(diff)))
        if self.kind == "fidelity":
            return _mean_cosine(outputs, reference)
        args = (outputs, targets, reference) if self.needs_reference else (outputs, targets)
        return _checked(self.name, self.fn(*args))


def class_indices(name: str, targets, n: int) -> np.ndarray:
    """The targets of ``n`` outputs as ``n`` class indices: shape ``[N]``, or ``[N, 1]`` flattened.

    Raises:
        ConfigError: any other shape (e.g. one-hot rows): comparing it to the predicted classes would
            broadcast, and the metric would be silently wrong.
    """
    t = np.asarray(targets)
    if t.ndim == 0 or len(t) != n or t.size != n:
        raise ConfigError(
            f"metric {name!r} compares one class index per sample; the targets have shape "
            f"{tuple(t.shape)} for {n} outputs (give class indices of shape [{n}])"
        )
    return t.reshape(n)


def _checked(name: str, value: object) -> float:
    """A user metric's value as a float; anything else is the metric's error, named."""
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.item()
    if hasattr(value, "item") and not isinstance(value, np.ndarray):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int | float | np.floating | np.integer):
        raise ConfigError(f"metric {name!r} returned {type(value).__name__}, expected a number")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"metric {name!r} returned {value}")
    return value


def _mean_cosine(outputs: np.ndarray, reference: np.ndarray) -> float:
    """Mean cosine similarity between each sample's output and the teacher's (flattened per sample)."""
    a = outputs.reshape(len(outputs), -1).astype(np.float64)
    b = np.asarray(reference).reshape(len(reference), -1).astype(np.float64)
    num = (a * b).sum(axis=1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.mean(num / np.maximum(den, 1e-12)))


def _confusion_update(state: dict, outputs: np.ndarray, targets: np.ndarray) -> None:
    pred = outputs.reshape(len(outputs), -1).argmax(axis=1)
    k = max(outputs.reshape(len(outputs), -1).shape[1], int(targets.max()) + 1)
    conf = state["confusion"]
    if conf is None or conf.shape[0] < k:
        grown = np.zeros((k, k), dtype=np.int64)
        if conf is not None:
            grown[: conf.shape[0], : conf.shape[1]] = conf
        conf = grown
    np.add.at(conf, (targets.astype(np.int64), pred), 1)
    state["confusion"] = conf


def _macro_f1(conf: np.ndarray | None) -> float:
    if conf is None:
        raise ConfigError("metric 'f1': the evaluation data yielded no batch")
    tp = np.diag(conf).astype(float)
    precision = tp / np.maximum(conf.sum(axis=0), 1)
    recall = tp / np.maximum(conf.sum(axis=1), 1)
    present = (conf.sum(axis=1) + conf.sum(axis=0)) > 0  # classes seen in targets or predictions
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0)
    return float(f1[present].mean())


accuracy = Metric("accuracy", kind="accuracy")
"""Top-1 accuracy of logits ``[batch, classes]`` against integer targets."""
f1 = Metric("f1", kind="f1")
"""Macro F1 over the classes present in the targets or the predictions."""
mse = Metric("mse", kind="mse", higher_is_better=False)
mae = Metric("mae", kind="mae", higher_is_better=False)
fidelity = Metric("fidelity", kind="fidelity", needs_targets=False, needs_reference=True)
"""Mean cosine similarity of the outputs to the teacher's outputs (no labels needed)."""


def top_k(k: int) -> Metric:
    """Top-``k`` accuracy."""
    return Metric(f"top{k}", kind="topk", k=k)


BUILTIN: dict[str, Metric] = {m.name: m for m in (accuracy, f1, mse, mae, fidelity, top_k(5))}


def resolve_metric(spec: object, where: str = "task.metric") -> Metric:
    """A :class:`Metric` from a built-in name (``accuracy``, ``top5``, ``f1``, ``mse``, ``mae``,
    ``fidelity``; ``topK`` for any K), a Metric, or a plain callable (higher is better)."""
    if isinstance(spec, Metric):
        return spec
    if isinstance(spec, str):
        if spec in BUILTIN:
            return BUILTIN[spec]
        if spec.startswith("top") and spec[3:].isdigit() and int(spec[3:]) >= 1:
            return top_k(int(spec[3:]))
        raise ConfigError(f"unknown metric {spec!r}; built-in: {', '.join(BUILTIN)} (or topK)", field=where)
    if callable(spec):
        return Metric(getattr(spec, "__name__", "metric"), fn=spec)
    raise ConfigError(
        f"a metric is a name, an autocompress.Metric or a callable, not {type(spec).__name__}", field=where
    )
