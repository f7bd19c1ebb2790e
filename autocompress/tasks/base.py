"""The Task protocol: a model factory, data, a metric and example inputs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of ``logits`` [N, C] against integer ``labels`` [N]."""
    return float((np.asarray(logits).argmax(axis=1) == np.asarray(labels)).mean())


METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {"accuracy": accuracy}


@dataclass
class Task:
    """Everything a study needs to know about the model to compress.

    Attributes:
        name: short name used in run folders and reports.
        model_fn: returns a fresh, untrained model (the teacher is trained from it once per run).
        train: ``(inputs, labels)`` tensors used for teacher training, fine-tuning and calibration.
        test: ``(inputs, labels)`` tensors on which every artifact's accuracy is measured.
        metric: name in :data:`METRICS` (higher is better).
        teacher_epochs / lr / batch_size: how the teacher is trained.
    """

    name: str
    model_fn: Callable[[], nn.Module]
    train: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    metric: str = "accuracy"
    teacher_epochs: int = 20
    lr: float = 1e-3
    batch_size: int = 64
    description: str = ""
    extra: dict = field(default_factory=dict)

    def example_inputs(self, batch: int = 1) -> tuple[torch.Tensor, ...]:
        """Inputs of the deployed shape (batch first), taken from the test split."""
        return (self.test[0][:batch].contiguous(),)

    def calibration_inputs(self, n: int = 256) -> np.ndarray:
        return self.train[0][:n].numpy()

    def score(self, logits: np.ndarray, labels: np.ndarray) -> float:
        return METRICS[self.metric](logits, labels)


def validate_task(task: object, where: str) -> Task:
    """Check that a factory's result is a usable Task; raise ConfigError naming ``where`` if not."""
    if not isinstance(task, Task):
        raise ConfigError(
            f"task factory returned {type(task).__name__}, expected autocompress.Task", field=where
        )
    if task.metric not in METRICS:
        raise ConfigError(f"unknown metric {task.metric!r}; known: {', '.join(METRICS)}", field=where)
    for split in ("train", "test"):
        x, y = getattr(task, split)
        if (
            not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor))
            or len(x) != len(y)
            or len(x) == 0
        ):
            raise ConfigError(f"task.{split} must be two non-empty tensors of equal length", field=where)
    try:
        model = task.model_fn().eval()
        with torch.no_grad():
            out = model(*task.example_inputs(2))
    except Exception as exc:  # the user's code: report it, do not crash
        raise ConfigError(
            f"task model failed on the task's inputs: {type(exc).__name__}: {exc}", field=where
        ) from exc
    n_classes = int(task.train[1].max()) + 1
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 2 or out.shape[1] < n_classes:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(
            f"task model output {shape} does not match the data: expected logits [batch, >= {n_classes} classes]",
            field=where,
        )
    return task
