"""User tasks given as module:factory in test study files."""

from __future__ import annotations

import torch
from torch import nn

from autocompress import Task


def mlp(hidden: int = 32) -> Task:
    """A Linear-only model on the digits data (flattened), built the way a user would."""
    from autocompress.tasks import load_task

    digits = load_task("digits", {"width": 8, "teacher_epochs": 1})
    flat = lambda xy: (xy[0].flatten(1), xy[1])  # noqa: E731
    return Task(
        name="mlp",
        model_fn=lambda: nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10)),
        train=flat(digits.train),
        test=flat(digits.test),
        teacher_epochs=5,
    )


def raises() -> Task:
    raise RuntimeError("dataset server unreachable")


def wrong_output() -> Task:
    x = torch.rand(20, 4)
    y = torch.randint(0, 5, (20,))
    return Task(name="bad", model_fn=lambda: nn.Linear(4, 2), train=(x, y), test=(x, y))


def nan_data() -> Task:
    """Inputs with NaN: any fine-tuning loss is NaN, so every trial must fail (and be recorded)."""
    t = mlp(8)
    x = t.train[0].clone()
    x[0, 0] = float("nan")
    t.train = (x, t.train[1])
    t.teacher_epochs = 0  # the (untrained) teacher never sees the NaN; fine-tuning does
    return t
