"""Built-in task: scikit-learn's 8x8 handwritten digits (ships with scikit-learn, no download)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .base import Task


def _block(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]


class DigitsCNN(nn.Module):
    """A CNN with BatchNorm, 128 channels at its widest: wide enough for int8 kernels to pay."""

    def __init__(self, width: int = 64):
        super().__init__()
        self.features = nn.Sequential(
            *_block(1, width // 2),
            *_block(width // 2, width),
            *_block(width, width),
            nn.MaxPool2d(2),
            *_block(width, 2 * width),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(2 * width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def load_digits_arrays() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 digits as [N, 8, 8] float images (0..16) and [N] int64 labels, read from the
    CSV that ships inside scikit-learn without importing it (``sklearn.datasets`` takes ~2 s to import,
    in every process that loads this task: each CLI run, each worker)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the digits tasks need scikit-learn (its digits CSV ships with it): pip install scikit-learn"
        )
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    table = np.loadtxt(path, delimiter=",")
    images = torch.tensor(table[:, :-1], dtype=torch.float32).reshape(-1, 8, 8)
    return images, torch.tensor(table[:, -1], dtype=torch.long)


# the default split, computed once with scikit-learn (the file says how); tests/tasks checks it still
# equals what scikit-learn computes
_SHIPPED_SPLITS = {0: Path(__file__).with_name("digits_split_seed0.json")}


def split_indices(seed: int, labels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices: scikit-learn's stratified 80/20 ``train_test_split`` with ``seed``."""
    if seed in _SHIPPED_SPLITS:
        data = json.loads(_SHIPPED_SPLITS[seed].read_text())
        return np.asarray(data["train"]), np.asarray(data["test"])
    from sklearn.model_selection import train_test_split

    return train_test_split(np.arange(len(labels)), test_size=0.2, random_state=seed, stratify=labels.numpy())


def _split(seed: int):
    images, y = load_digits_arrays()
    x = images.unsqueeze(1) / 16.0
    idx_train, idx_test = split_indices(seed, y)
    return (x[idx_train], y[idx_train]), (x[idx_test], y[idx_test])


def digits(width: int = 64, teacher_epochs: int = 20, seed: int = 0) -> Task:
    """The quickstart task: 1797 digit images, 80/20 stratified split (fixed seed)."""
    train, test = _split(seed)
    return Task(
        name="digits",
        model_fn=lambda: DigitsCNN(width),
        train=train,
        test=test,
        teacher_epochs=teacher_epochs,
        description=f"sklearn digits 8x8, CNN width {width}",
    )


def digits_resnet(width: int = 32, teacher_epochs: int = 20, seed: int = 0) -> Task:
    """Digits with a ResNet-style CNN (residual blocks with BatchNorm, a strided 1x1 shortcut):
    structured pruning must keep every residual addition consistent."""
    from ..testing import ResNetStyle

    train, test = _split(seed)
    return Task(
        name="digits_resnet",
        model_fn=lambda: ResNetStyle(width, in_channels=1),
        train=train,
        test=test,
        teacher_epochs=teacher_epochs,
        description=f"sklearn digits 8x8, ResNet-style CNN width {width} (4 residual blocks)",
    )
