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


def sensitive_mlp() -> Task:
    """The mlp task with a first layer that low-bit quantization ruins and a robust classifier.

    The inputs get a leading feature that is always zero; the first layer's weights on it are huge.
    They never change the output (nor get a gradient), but they set each channel's quantization scale,
    so at 4 bits every other weight of that layer rounds to zero while at 8 bits the grid is still fine.
    """
    t = mlp(32)

    def model_fn():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(65, 32), nn.ReLU(), nn.Linear(32, 10))
        with torch.no_grad():
            model[0].weight[:, 0] = 40 * model[0].weight[:, 1:].abs().amax(1)
        return model

    pad = lambda xy: (torch.cat([torch.zeros(len(xy[0]), 1), xy[0]], 1), xy[1])  # noqa: E731
    return Task(
        name="sensitive_mlp",
        model_fn=model_fn,
        train=pad(t.train),
        test=pad(t.test),
        teacher_epochs=10,
        lr=3e-3,
    )
