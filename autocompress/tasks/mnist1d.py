"""Built-in tasks on MNIST-1D (Greydanus, 2020), generated offline by the ``mnist1d`` package.

``mnist1d.data.make_dataset`` builds the 5000 sequences of length 40 from ten templates with a fixed
seed (no download; the package's ``get_dataset`` would fetch a pickle, which this module never calls).
The paper reports ~94% test accuracy for a small 1-D CNN and ~99% is out of reach for MLPs, so the
task separates architectures while training in seconds on a CPU.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ..testing import TinyTransformer
from .base import Task


@functools.lru_cache(maxsize=4)
def _dataset(num_samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples, args.seed = num_samples, seed
    data = make_dataset(args)
    x, x_test = (torch.tensor(data[k], dtype=torch.float32) for k in ("x", "x_test"))
    y, y_test = (torch.tensor(data[k], dtype=torch.long) for k in ("y", "y_test"))
    return x, y, x_test, y_test


class Mnist1dCNN(nn.Module):
    """A 1-D CNN over the length-40 signal: four conv blocks (BatchNorm, ReLU), global pool, linear."""

    def __init__(self, width: int = 64, classes: int = 10):
        super().__init__()

        def block(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
            return [nn.Conv1d(c_in, c_out, 5, stride, 2, bias=False), nn.BatchNorm1d(c_out), nn.ReLU()]

        self.features = nn.Sequential(
            *block(1, width // 2, 1),
            *block(width // 2, width, 2),
            *block(width, width, 1),
            *block(width, 2 * width, 2),
        )
        self.classifier = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [batch, 40]
        return self.classifier(self.features(x.unsqueeze(1)).mean(dim=2))


def _task(
    name: str, model_fn, num_samples: int, seed: int, teacher_epochs: int, lr: float, what: str
) -> Task:
    x, y, x_test, y_test = _dataset(num_samples, seed)
    return Task(
        name=name,
        model_fn=model_fn,
        train=(x, y),
        test=(x_test, y_test),
        teacher_epochs=teacher_epochs,
        lr=lr,
        description=f"MNIST-1D ({len(x)} train / {len(x_test)} test sequences of length 40), {what}",
    )


def mnist1d_cnn(width: int = 64, teacher_epochs: int = 30, num_samples: int = 5000, seed: int = 42) -> Task:
    """MNIST-1D with :class:`Mnist1dCNN` (conv-heavy)."""
    return _task(
        "mnist1d_cnn",
        lambda: Mnist1dCNN(width),
        num_samples,
        seed,
        teacher_epochs,
        3e-3,
        f"1-D CNN width {width}",
    )


def mnist1d_transformer(
    dim: int = 64,
    depth: int = 2,
    heads: int = 4,
    teacher_epochs: int = 40,
    num_samples: int = 5000,
    seed: int = 42,
) -> Task:
    """MNIST-1D with a small transformer encoder over patches of 4 samples (Linear-heavy)."""
    return _task(
        "mnist1d_transformer",
        lambda: TinyTransformer(length=40, patch=4, dim=dim, depth=depth, heads=heads),
        num_samples,
        seed,
        teacher_epochs,
        2e-3,
        f"transformer encoder dim {dim}, depth {depth}, {heads} heads",
    )
