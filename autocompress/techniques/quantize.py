"""Weight fake quantization with straight-through gradients (QAT), and learned step sizes (LSQ).

Grids (``bits`` from 2 to 8):

- ``symmetric``: integers in ``[-qmax, qmax]`` with ``qmax = 2**(bits-1) - 1``, zero point 0,
  scale ``amax / qmax`` (the rule ONNX Runtime uses for symmetric weights);
- ``asymmetric``: integers in ``[-2**(bits-1), 2**(bits-1) - 1]`` with an integer zero point,
  scale ``(max - min) / (qmax - qmin)`` over the range widened to include 0 (so 0 is exact).

Granularity ``channel`` gives one scale (and zero point) per output channel, ``tensor`` one for the
whole weight. ``reduce_range`` drops one bit of an 8-bit grid (CPUs without VNNI can saturate the
int16 accumulation of u8*s8 products; ORT's docs recommend it there).

:func:`record_weight_quant` stores, on the module, the integers, scales and zero points the
fine-tuned weight sits on (``module.ac_weight_quant``, a :class:`WeightQuant`); a backend writes
exactly these into its artifact. With LSQ the scale is a trained parameter, which cannot be
recomputed from the weight afterwards: the record is the only faithful source.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import TechniqueError

GRANULARITIES = ("channel", "tensor")
SCHEMES = ("symmetric", "asymmetric")
QUANT_MODES = ("static", "dynamic")  # dynamic: int8 weights, activations quantized at run time
CALIBRATIONS = ("minmax", "percentile")  # activation ranges of the 8-bit static path
RECURRENT = (nn.LSTM, nn.GRU)
QUANT_ATTR = "ac_weight_quant"  # module attribute holding a WeightQuant after finalization
MODE_ATTR = "ac_quant_mode"  # module attribute: "static" / "dynamic"
CALIBRATION_ATTR = "ac_calibration"  # attribute of the root model: the activation calibration method


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


@dataclass
class WeightQuant:
    """The integer form of a quantized weight, as the artifact must hold it (``w = (q - zero) * scale``).

    ``scale`` and ``zero_point`` have one entry per output channel (``channel``) or are 0-d (``tensor``).
    """

    bits: int
    scheme: str
    granularity: str
    q: np.ndarray  # int32, torch layout
    scale: np.ndarray  # float32
    zero_point: np.ndarray  # int32
    lsq: bool = False

    def dequantize(self) -> np.ndarray:
        shape = (-1, *([1] * (self.q.ndim - 1))) if self.scale.ndim else ()
        return (self.q - self.zero_point.reshape(shape)) * self.scale.reshape(shape)


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


def add_fake_quant(
    module: nn.Module,
    bits: int,
    reduce_range: bool = False,
    scheme: str = "symmetric",
    granularity: str = "channel",
    lsq: bool = False,
) -> None:
    """Fake-quantize ``module.weight`` at ``bits`` (after any mask already registered).

    2 to 8 bits: integer grid of the given scheme and granularity (LSQ: learned scale); 16: float16.
    """
    if bits == 16:
        fq: nn.Module = FakeHalf()
    elif lsq:
        fq = LSQFakeQuant(module.weight.detach(), bits, reduce_range, scheme, granularity)
    else:
        fq = FakeQuant(bits, reduce_range, scheme, granularity)
    parametrize.register_parametrization(module, "weight", fq)


def record_weight_quant(module: nn.Module) -> WeightQuant | None:
    """Store the integer form of a fake-quantized weight on the module (``module.ac_weight_quant``).

    Call before the parametrizations are removed. Returns the record (None: not integer-quantized).
    """
    if not parametrize.is_parametrized(module, "weight"):
        return None
    plist = module.parametrizations["weight"]
    last = plist[-1]
    if not isinstance(last, FakeQuant):
        return None
    with torch.no_grad():
        w = plist.original
        for p in list(plist)[:-1]:
            w = p(w)
        record = last.integers(w)
    setattr(module, QUANT_ATTR, record)
    return record
