"""A torchvision-style ResNet-18 compressed as a user would: a trained checkpoint in a local file,
DataLoaders of ``(image, label)`` batches, top-1 accuracy.

Study file: ``task: {name: autocompress.examples.resnet18:resnet18_task}`` (the bundled study ``resnet18``).

The architecture is torchvision's ``resnet18`` written out here (torchvision is not a dependency): the
same module names (``conv1``, ``bn1``, ``layer1`` ... ``layer4``, ``fc``), ``BasicBlock`` with its
``downsample`` branch, and the same initialization; ``width`` scales every stage (64 is torchvision's).

The data: scikit-learn's digits (shipped with scikit-learn, no download), upscaled to
``image_size`` x ``image_size`` and tinted into 3 channels with a per-image foreground / background
colour. The checkpoint: on first use the set-up trains the network for a few epochs (fixed seed) and
writes ``<checkpoint>`` (safetensors) with its architecture beside it (``.json``); afterwards, and for a
checkpoint a user points to, the model is built and the weights loaded from the file.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ..errors import ConfigError
from ..tasks.base import Task


# -- the architecture (torchvision's layout) ----------------------------------------------------------
def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision's ``ResNet`` for ``BasicBlock`` (7x7 stride-2 stem, max pool, four stages, fc)."""

    def __init__(self, layers: tuple[int, ...] = (2, 2, 2, 2), num_classes: int = 1000, width: int = 64):
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(width * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width * 8 * BasicBlock.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * BasicBlock.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * BasicBlock.expansion, stride),
                nn.BatchNorm2d(planes * BasicBlock.expansion),
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * BasicBlock.expansion
        layers += [BasicBlock(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes: int = 1000, width: int = 64) -> ResNet:
    """ResNet-18: ``BasicBlock`` x [2, 2, 2, 2]."""
    return ResNet((2, 2, 2, 2), num_classes=num_classes, width=width)


# -- the data -----------------------------------------------------------------------------------------
def tinted_digits(image_size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 digits as [N, 3, image_size, image_size] float images (per-image colours,
    normalized per channel) and [N] int64 labels."""
    from ..tasks.digits import load_digits_arrays

    images, labels = load_digits_arrays()
    x = images.unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False).clamp(0, 1)
    rng = np.random.default_rng(seed)
    fg = torch.tensor(rng.uniform(0.5, 1.0, (len(x), 3, 1, 1)), dtype=torch.float32)
    bg = torch.tensor(rng.uniform(0.0, 0.4, (len(x), 3, 1, 1)), dtype=torch.float32)
    x = fg * x + bg * (1 - x)
    x = (x - x.mean(dim=(0, 2, 3), keepdim=True)) / x.std(dim=(0, 2, 3), keepdim=True)
    return x.contiguous(), labels


def splits(image_size: int, seed: int = 0, eval_fraction: float = 0.2, samples: int | None = None):
    """(train, eval) ``TensorDataset``s, a fixed shuffle of the digits (the first ``samples`` of it)."""
    x, y = tinted_digits(image_size, seed)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:samples]
    n_eval = round(eval_fraction * len(perm))
    ev, tr = perm[:n_eval], perm[n_eval:]
    return TensorDataset(x[tr], y[tr]), TensorDataset(x[ev], y[ev])


# -- the checkpoint -----------------------------------------------------------------------------------
def train_checkpoint(
    path: Path,
    arch: dict,
    train: TensorDataset,
    epochs: int,
    batch_size: int,
    seed: int,
    build: Callable[[dict], nn.Module] | None = None,
) -> None:
    """Train a model briefly (Adam, one-cycle, cross-entropy) and write it to ``path`` + its ``.json``.

    ``build(arch)`` makes the untrained model (default: a ResNet-18 of ``arch``'s classes and width)."""
    torch.manual_seed(seed)
    model = build(arch) if build else resnet18(arch["num_classes"], arch["width"])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=2e-3, total_steps=max(1, epochs * -(-len(train) // batch_size))
    )
    loader = DataLoader(
        train, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    os.replace(tmp, path)
    path.with_suffix(".json").write_text(json.dumps(arch))


def load_resnet18(path: str | Path) -> ResNet:
    """A ResNet-18 from a checkpoint file and its architecture record (what a user's loader does)."""
    path = Path(path)
    arch = json.loads(path.with_suffix(".json").read_text())
    model = resnet18(arch["num_classes"], arch["width"])
    try:
        model.load_state_dict(load_file(str(path)))
    except RuntimeError as exc:
        raise ConfigError(
            f"checkpoint {path} does not match a ResNet-18 of width {arch['width']}: {str(exc).splitlines()[0]}",
            field="task.options.checkpoint",
        ) from None
    return model.eval()


def images(batch) -> torch.Tensor:
    """The batch adapter: the image tensor of an ``(image, label)`` batch."""
    return batch[0]


def labels(batch) -> torch.Tensor:
    """The target adapter: the labels of an ``(image, label)`` batch."""
    return batch[1]


def ensure_checkpoint(path: Path, arch: dict, what: str, **training) -> None:
    """Train ``path`` (:func:`train_checkpoint` with ``training``: train, epochs, batch_size, seed and
    optionally build) if it does not exist; refuse one made for another ``arch`` (one line naming both,
    on ``task.options.checkpoint``)."""
    if not path.exists():
        print(
            f"training the {what} checkpoint ({training['epochs']} epochs), written to {path}",
            file=sys.stderr,
        )
        train_checkpoint(path, arch, **training)
    have = json.loads(path.with_suffix(".json").read_text()) if path.with_suffix(".json").exists() else {}
    if {k: have.get(k) for k in arch} != arch:
        raise ConfigError(
            f"checkpoint {path} was made for {have or 'an unknown model'}, the options ask {arch}; "
            "use another checkpoint path",
            field="task.options.checkpoint",
        )


def image_task(
    name: str,
    model: nn.Module,
    train,
    evaluation,
    batch_size: int,
    calibration_samples: int,
    description: str,
) -> Task:
    """The Task of an image classifier on the tinted digits: (image, label) DataLoaders, accuracy."""
    return Task(
        name=name,
        model=model,
        # a fixed order: calibration and rebuilds see the same batches
        train=DataLoader(train, batch_size=batch_size, shuffle=False),
        eval=DataLoader(evaluation, batch_size=batch_size, shuffle=False),
        inputs=images,
        targets=labels,
        metric="accuracy",
        batch_size=batch_size,
        calibration_samples=calibration_samples,
        description=description,
    )


def resnet18_task(
    checkpoint: str = "runs/_checkpoints/resnet18.safetensors",
    image_size: int = 64,
    width: int = 64,
    epochs: int = 3,
    batch_size: int = 64,
    calibration_samples: int = 128,
    samples: int | None = None,
    seed: int = 0,
) -> Task:
    """A Task for a ResNet-18 loaded from ``checkpoint`` (trained there on first use).

    Args:
        checkpoint: safetensors file of the trained model (its architecture in the ``.json`` beside it).
        image_size: the images' side (3 x image_size x image_size inputs).
        width: channels of the first stage (64 is torchvision's ResNet-18).
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
        "arch": "resnet18",
        "num_classes": 10,
        "width": width,
        "image_size": image_size,
        "samples": samples,
    }
    ensure_checkpoint(path, arch, "ResNet-18", train=train, epochs=epochs, batch_size=batch_size, seed=seed)
    return image_task(
        "resnet18",
        load_resnet18(path),
        train,
        evaluation,
        batch_size,
        calibration_samples,
        f"ResNet-18 (width {width}) on tinted digits at 3x{image_size}x{image_size}",
    )
