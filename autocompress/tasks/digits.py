"""Built-in task: scikit-learn's 8x8 handwritten digits (ships with scikit-learn, no download)."""

from __future__ import annotations

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


def _split(seed: int):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(
        torch.arange(len(y)).numpy(), test_size=0.2, random_state=seed, stratify=y.numpy()
    )
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
