"""A torchvision-style MobileNetV2 compressed as a user would: a trained checkpoint in a local file,
DataLoaders of ``(image, label)`` batches, top-1 accuracy.

Study file: ``task: {name: autocompress.examples.mobilenet_v2:mobilenet_v2_task}``
(the bundled study ``mobilenet_v2``).

The architecture is torchvision's ``mobilenet_v2`` written out here (torchvision is not a dependency):
the same module names (``features.0`` the stem, ``features.1`` ... ``features.17`` the inverted residual
blocks with ``conv.0`` / ``conv.1`` / ``conv.2``, ``features.18`` the last 1x1 conv, ``classifier.1``),
ReLU6, the same inverted-residual settings and initialization; ``width_mult`` scales the channels as
torchvision's does (rounded to multiples of 8).

The data and the checkpoint are those of :mod:`.resnet18` (tinted digits at ``image_size``; trained on
first use for a few epochs with a fixed seed, written as safetensors + ``.json``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ..errors import ConfigError
from ..tasks.base import Task
from .resnet18 import ensure_checkpoint, image_task, splits

# torchvision's inverted residual settings: expansion t, output channels c, repeats n, first stride s
SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def make_divisible(v: float, divisor: int = 8) -> int:
    """torchvision's ``_make_divisible``: the nearest multiple of ``divisor``, never 10% below ``v``."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


class ConvBNReLU6(nn.Sequential):
    def __init__(self, inp: int, oup: int, kernel: int = 3, stride: int = 1, groups: int = 1):
        super().__init__(
            nn.Conv2d(inp, oup, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(oup),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = round(inp * expand_ratio)
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU6(inp, hidden, kernel=1))  # expand (pointwise)
        layers += [
            ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),  # depthwise
            nn.Conv2d(hidden, oup, 1, bias=False),  # project (pointwise, linear)
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """torchvision's ``MobileNetV2`` (stride-2 stem, 17 inverted residual blocks, 1x1 conv to 1280, fc)."""

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, dropout: float = 0.2):
        super().__init__()
        inp = make_divisible(32 * width_mult)
        last = make_divisible(1280 * max(1.0, width_mult))
        features: list[nn.Module] = [ConvBNReLU6(3, inp, stride=2)]
        for t, c, n, s in SETTINGS:
            oup = make_divisible(c * width_mult)
            for i in range(n):
                features.append(InvertedResidual(inp, oup, s if i == 0 else 1, t))
                inp = oup
        features.append(ConvBNReLU6(inp, last, kernel=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


def _build(arch: dict) -> MobileNetV2:
    return MobileNetV2(arch["num_classes"], arch["width_mult"])


def load_mobilenet_v2(path: str | Path) -> MobileNetV2:
    """A MobileNetV2 from a checkpoint file and its architecture record (what a user's loader does)."""
    path = Path(path)
    arch = json.loads(path.with_suffix(".json").read_text())
    model = _build(arch)
    try:
        model.load_state_dict(load_file(str(path)))
    except RuntimeError as exc:
        raise ConfigError(
            f"checkpoint {path} does not match a MobileNetV2 of width_mult {arch['width_mult']}: "
            f"{str(exc).splitlines()[0]}",
            field="task.options.checkpoint",
        ) from None
    return model.eval()


def mobilenet_v2_task(
    checkpoint: str = "runs/_checkpoints/mobilenet_v2.safetensors",
    image_size: int = 64,
    width_mult: float = 1.0,
    epochs: int = 6,
    batch_size: int = 64,
    calibration_samples: int = 128,
    samples: int | None = None,
    seed: int = 0,
) -> Task:
    """A Task for a MobileNetV2 loaded from ``checkpoint`` (trained there on first use).

    Args:
        checkpoint: safetensors file of the trained model (its architecture in the ``.json`` beside it).
        image_size: the images' side (3 x image_size x image_size inputs).
        width_mult: torchvision's width multiplier (1.0: 32-channel stem, 1280 features).
        epochs: teacher training epochs when the checkpoint is created.
        batch_size: the DataLoaders' batch size.
        calibration_samples: samples the int8 layers are calibrated on.
        samples: use only this many of the 1,797 digits (train + eval; tiny tests).
        seed: data shuffle and training seed.
    """
    if image_size < 32:
        raise ConfigError(
            f"image_size {image_size} < 32 (five stride-2 stages)", field="task.options.image_size"
        )
    train, evaluation = splits(image_size, seed, samples=samples)
    path = Path(checkpoint)
    arch = {
        "arch": "mobilenet_v2",
        "num_classes": 10,
        "width_mult": width_mult,
        "image_size": image_size,
        "samples": samples,
    }
    ensure_checkpoint(
        path, arch, "MobileNetV2", train=train, epochs=epochs, batch_size=batch_size, seed=seed, build=_build
    )
    return image_task(
        "mobilenet_v2",
        load_mobilenet_v2(path),
        train,
        evaluation,
        batch_size,
        calibration_samples,
        f"MobileNetV2 (width {width_mult}) on tinted digits at 3x{image_size}x{image_size}",
    )
