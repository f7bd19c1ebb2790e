"""Per-channel symmetric weight fake quantization with straight-through gradients (QAT)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import TechniqueError


def qmax_for(bits: int, reduce_range: bool = False) -> int:
    """Largest integer of a symmetric signed ``bits`` grid: 127 for 8 bits, 7 for 4.

    ``reduce_range`` drops one bit of an 8-bit grid (63): CPUs without VNNI can saturate the
    int16 accumulation of u8*s8 products, so ONNX Runtime's own docs recommend it there.
    """
    if not (2 <= bits <= 16):
        raise TechniqueError(f"cannot quantize to {bits} bits (allowed: 2..16)")
    if reduce_range and bits == 8:
        bits = 7
    return 2 ** (bits - 1) - 1


def channel_scale(w: torch.Tensor, qmax: int) -> torch.Tensor:
    """Per-output-channel scale ``amax / qmax`` (the rule ONNX Runtime uses for symmetric weights)."""
    amax = w.detach().abs().reshape(w.shape[0], -1).amax(dim=1)
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    return scale.view(-1, *([1] * (w.dim() - 1)))


def quantize_weight(w: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Integers in ``[-qmax, qmax]`` and per-channel scales with ``w ~= q * scale``."""
    scale = channel_scale(w, qmax)
    q = torch.clamp(torch.round(w / scale), -qmax, qmax)
    return q.to(torch.int32), scale.flatten()


def fake_quant(w: torch.Tensor, qmax: int) -> torch.Tensor:
    """``q * scale`` in the forward pass, identity gradient (straight-through estimator)."""
    scale = channel_scale(w, qmax)
    wq = torch.clamp(torch.round(w / scale), -qmax, qmax) * scale
    return w + (wq - w).detach()


class FakeQuant(nn.Module):
    """Parametrization applying :func:`fake_quant` to a weight."""

    def __init__(self, bits: int, reduce_range: bool = False):
        super().__init__()
        self.bits = bits
        self.qmax = qmax_for(bits, reduce_range)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return fake_quant(w, self.qmax)


class FakeHalf(nn.Module):
    """Parametrization rounding a weight to float16 (straight-through gradient)."""

    bits = 16

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w + (w.half().to(w.dtype) - w).detach()


def add_fake_quant(module: nn.Module, bits: int, reduce_range: bool = False) -> None:
    """Fake-quantize ``module.weight`` at ``bits`` (after any mask already registered).

    2 to 8 bits: symmetric per-channel integer grid; 16: float16 rounding.
    """
    fq = FakeHalf() if bits == 16 else FakeQuant(bits, reduce_range)
    parametrize.register_parametrization(module, "weight", fq)
