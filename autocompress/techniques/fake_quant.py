"""Fake quantization of weights for training: the integer grid (:func:`int_range`), per-channel or
per-tensor scales (:func:`weight_qparams`), and the parametrizations a quantized layer's weight goes
through while fine-tuning (:class:`FakeQuant`, :class:`LSQFakeQuant` with learned step sizes,
:class:`FakeHalf`). :mod:`.quantize` applies them to a plan and re-exports these names."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from ..errors import TechniqueError
from ..lowering import WeightQuant, channel_scale, qmax_for

GRANULARITIES = ("channel", "tensor")
SCHEMES = ("symmetric", "asymmetric")


def int_range(bits: int, scheme: str = "symmetric", reduce_range: bool = False) -> tuple[int, int]:
    """``(qmin, qmax)`` of the integer grid: ``(-127, 127)`` symmetric 8-bit, ``(-128, 127)`` asymmetric."""
    if scheme not in SCHEMES:
        raise TechniqueError(f"quant_scheme {scheme!r} is not one of {list(SCHEMES)}")
    qmax = qmax_for(bits, reduce_range)
    return (-qmax, qmax) if scheme == "symmetric" else (-qmax - 1, qmax)


def _reduce(w: torch.Tensor, granularity: str, op) -> torch.Tensor:
    if granularity not in GRANULARITIES:
        raise TechniqueError(f"quant_granularity {granularity!r} is not one of {list(GRANULARITIES)}")
    flat = w.detach().reshape(w.shape[0], -1) if granularity == "channel" else w.detach().reshape(1, -1)
    return op(flat, dim=1)


def _shape(v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (w.dim() - 1)))


def weight_qparams(
    w: torch.Tensor, bits: int, scheme: str = "symmetric", granularity: str = "channel", reduce_range=False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max scale and zero point, shaped to broadcast against ``w`` (``[C, 1, ...]`` or ``[1, 1, ...]``)."""
    qmin, qmax = int_range(bits, scheme, reduce_range)
    if scheme == "symmetric":
        amax = _reduce(w.abs(), granularity, torch.amax)
        scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
        zero = torch.zeros_like(scale)
    else:
        lo = _reduce(w, granularity, torch.amin).clamp(max=0)
        hi = _reduce(w, granularity, torch.amax).clamp(min=0)
        scale = torch.where(hi > lo, (hi - lo) / (qmax - qmin), torch.ones_like(hi))
        zero = torch.clamp(torch.round(qmin - lo / scale), qmin, qmax)
    return _shape(scale, w), _shape(zero, w)


def fake_quant(w: torch.Tensor, qmax: int) -> torch.Tensor:
    """``q * scale`` in the forward pass, identity gradient (straight-through estimator)."""
    scale = channel_scale(w, qmax)
    wq = torch.clamp(torch.round(w / scale), -qmax, qmax) * scale
    return w + (wq - w).detach()


class FakeQuant(nn.Module):
    """Parametrization putting a weight on its min-max integer grid (straight-through gradient)."""

    lsq = False

    def __init__(
        self, bits: int, reduce_range: bool = False, scheme: str = "symmetric", granularity: str = "channel"
    ):
        super().__init__()
        self.bits, self.scheme, self.granularity, self.reduce_range = bits, scheme, granularity, reduce_range
        self.qmin, self.qmax = int_range(bits, scheme, reduce_range)
        weight_qparams(torch.zeros(1, 1), bits, scheme, granularity)  # validates granularity early

    def qparams(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return weight_qparams(w, self.bits, self.scheme, self.granularity, self.reduce_range)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        scale, zero = self.qparams(w)
        wq = (torch.clamp(torch.round(w / scale) + zero, self.qmin, self.qmax) - zero) * scale
        return w + (wq - w).detach()

    def integers(self, w: torch.Tensor) -> WeightQuant:
        """The integer form of ``w`` on this grid (``w`` being the parametrization's input)."""
        scale, zero = self.qparams(w)
        scale = scale.detach()
        q = torch.clamp(torch.round(w.detach() / scale) + zero, self.qmin, self.qmax)
        flat = (lambda t: t.flatten()) if self.granularity == "channel" else (lambda t: t.reshape(()))
        return WeightQuant(
            self.bits,
            self.scheme,
            self.granularity,
            q.to(torch.int32).numpy(),
            flat(scale).numpy().astype(np.float32),
            flat(zero).to(torch.int32).numpy(),
            self.lsq,
        )


def _grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """``x`` in the forward pass, gradient multiplied by ``g`` (LSQ's step-size gradient scale)."""
    return (x - x * g).detach() + x * g


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


class LSQFakeQuant(FakeQuant):
    """Learned step size quantization (Esser et al., 2019): the step is learned (as ``log_scale``).

    The forward pass is ``(round(clamp(w / s + z, qmin, qmax)) - z) * s`` with a straight-through
    round; the scale's gradient is multiplied by ``g = 1 / sqrt(n * qmax)`` (``n`` = weights per
    scale), as in the paper. The scale starts from the min-max rule (fine-tuning starts from a trained
    model, where that is already a good step), and the zero point of an asymmetric grid stays at its
    min-max value (LSQ learns the step only).
    """

    lsq = True

    def __init__(
        self,
        weight: torch.Tensor,
        bits: int,
        reduce_range: bool = False,
        scheme: str = "symmetric",
        granularity: str = "channel",
    ):
        super().__init__(bits, reduce_range, scheme, granularity)
        scale, zero = weight_qparams(weight, bits, scheme, granularity, reduce_range)
        # the step is learned as its logarithm: Adam moves a parameter by about ``lr`` per update
        # whatever its size, which would push steps of ~1e-3 through zero within a few updates
        self.log_scale = nn.Parameter(scale.clamp_min(1e-12).log())
        self.register_buffer("zero", zero.clone())
        per_scale = weight.numel() // scale.numel()
        self.grad_factor = 1.0 / math.sqrt(per_scale * self.qmax)

    @property
    def scale(self) -> torch.Tensor:
        return self.log_scale.exp()

    def qparams(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.scale, self.zero

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        s = _grad_scale(self.log_scale, self.grad_factor).exp()
        q = _round_ste(torch.clamp(w / s + self.zero, self.qmin, self.qmax))
        return (q - self.zero) * s


class FakeHalf(nn.Module):
    """Parametrization rounding a weight to float16 (straight-through gradient)."""

    bits = 16

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w + (w.half().to(w.dtype) - w).detach()
