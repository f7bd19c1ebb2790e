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


def trained_mlp(seed: int = 0, hidden: int = 16) -> Task:
    """A user's trained model (``model=``, no training by the run); ``seed`` picks other weights."""
    t = mlp(hidden)
    torch.manual_seed(seed)
    return Task(name="trained_mlp", model=t.model_fn().eval(), train=t.train, test=t.test)


class _Svd(nn.Module):
    """A model that cannot be exported to ONNX (``torch.linalg.svdvals`` has no ONNX operator)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(x) + torch.linalg.svdvals(x.view(-1, 8, 8)).sum(-1, keepdim=True)


def not_exportable() -> Task:
    t = mlp(16)
    return Task(name="svd", model=_Svd().eval(), train=t.train, test=t.test)


class _Stream(torch.utils.data.IterableDataset):
    """Batches of the digits data, as a stream without a length."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __iter__(self):
        for i in range(0, len(self.x), 32):
            yield self.x[i : i + 32], self.y[i : i + 32]


def stream_without_length() -> Task:
    t = mlp(16)
    torch.manual_seed(0)
    return Task(name="stream", model=t.model_fn().eval(), train=_Stream(*t.train), test=t.test)


def column_labels() -> Task:
    """Labels of shape [N, 1] (a user's regression-style layout) with the accuracy metric."""
    t = trained_mlp()
    t.train = (t.train[0], t.train[1][:, None])
    t.test = (t.test[0], t.test[1][:, None])
    return t


def int8_sensitive_mlp() -> Task:
    """A trained mlp (``model=``) whose classifier reads one hidden unit of huge constant value (bias 300)
    through zero weights: static int8 calibrates the classifier's input grid to it, so every other hidden
    unit rounds to a step or two and the accuracy falls, while the first layer's int8 costs nothing
    measurable. What the mixed int8 plan is for: keep the classifier (13% of the MACs) float."""
    t = mlp(64)
    torch.manual_seed(0)
    model = t.model_fn()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, y = t.train
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    with torch.no_grad():
        model[0].weight[0] = 0.0
        model[0].bias[0] = 300.0
        model[2].weight[:, 0] = 0.0
    return Task(name="int8_sensitive_mlp", model=model.eval(), train=t.train, test=t.test)
