"""What the pipeline tells a backend: the per-layer lowering spec (plain data, no torch modules).

:func:`autocompress.pipeline.compress` returns a :class:`LoweringSpec` with the compressed model;
``Backend.lower(model, example_inputs, spec, out_dir, ...)`` receives it explicitly. Nothing travels
as attributes of torch modules, and no backend imports a technique module: the integer grid of a
weight (:class:`WeightQuant`) and the min-max fallback grid (:func:`symmetric_grid`) live here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from .errors import TechniqueError

FLOAT_BITS = 32  # the bits of a float layer (16: float16; 2 to 8: an integer grid); defined here only
QUANT_MODES = ("static", "dynamic")  # dynamic: int8 weights, activations quantized at run time
CALIBRATIONS = ("minmax", "percentile")  # activation ranges of the 8-bit static path


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
    # float32, torch layout: the weight the integers were rounded from, kept where no fine-tune moved
    # the weight after rounding (a post-training plan): bias correction's float reference
    source: np.ndarray | None = None

    def dequantize(self) -> np.ndarray:
        shape = (-1, *([1] * (self.q.ndim - 1))) if self.scale.ndim else ()
        return (self.q - self.zero_point.reshape(shape)) * self.scale.reshape(shape)


def symmetric_grid(weight: torch.Tensor, bits: int, reduce_range: bool = False) -> WeightQuant:
    """The symmetric per-channel min-max grid of ``weight`` (for layers no fine-tune recorded)."""
    q, scale = quantize_weight(weight.detach(), qmax_for(bits, reduce_range))
    return WeightQuant(
        bits,
        "symmetric",
        "channel",
        q.numpy(),
        scale.numpy().astype(np.float32),
        np.zeros(len(scale), np.int32),
    )


@dataclass
class SharedWeight:
    """A weight shared to a codebook (weight sharing): ``w = codebook[index] * keep``.

    ``index`` (int64, torch layout) holds values in ``[0, len(codebook))``; ``keep`` (bool, torch layout)
    is False where the weight was pruned (exact zeros, not coded), None when nothing was pruned.
    ``bits`` is the width of one stored index: ``len(codebook) == 2 ** bits``.
    """

    bits: int
    codebook: np.ndarray  # float32 [2**bits]
    index: np.ndarray  # int64, torch layout
    keep: np.ndarray | None = None  # bool, torch layout

    def weight(self) -> np.ndarray:
        w = self.codebook[self.index].astype(np.float32)
        return w if self.keep is None else w * self.keep


@dataclass(frozen=True)
class LayerLowering:
    """How one module of the compressed model is lowered.

    Attributes:
        bits: 32 float, 16 float16, 2 to 8 an integer grid.
        mode: ``static`` (calibrated activation ranges) or ``dynamic`` (activations quantized at run time).
        weight: the integers, scales and zero points the fine-tune trained (None: the backend uses
            :func:`symmetric_grid`); it also carries the grid's scheme and granularity.
        shared: the codebook and indices of a weight-shared layer (float bits only), None otherwise.
        sparse: the weight's zeros are stored as such (the backend stores the nonzeros and their
            positions where that is smaller than the dense weight).
    """

    bits: int = FLOAT_BITS
    mode: str = "static"
    weight: WeightQuant | None = None
    shared: SharedWeight | None = None
    sparse: bool = False

    @property
    def scheme(self) -> str:
        return self.weight.scheme if self.weight is not None else "symmetric"

    @property
    def granularity(self) -> str:
        return self.weight.granularity if self.weight is not None else "channel"


@dataclass(frozen=True)
class LoweringSpec:
    """Per-layer lowering decisions of one compressed model, plus plan-wide ones.

    Attributes:
        layers: effective module name -> :class:`LayerLowering` (absent modules stay float).
        calibration: activation calibration of the 8-bit static layers (``minmax`` / ``percentile``).
        bias_correction: correct the static int8 convs' output means on calibration samples where the
            backend does (:mod:`autocompress.backends.bias_correction`); a latency profile's one-unit
            rows turn it off (it is one full-graph pass per conv, and the trials get it).
    """

    layers: dict[str, LayerLowering] = field(default_factory=dict)
    calibration: str = "minmax"
    bias_correction: bool = True

    @classmethod
    def coerce(cls, spec: LoweringSpec | Mapping[str, int] | None) -> LoweringSpec:
        """A spec as it is, or one made from a plain ``{module: bits}`` map (static, min-max grids)."""
        if isinstance(spec, LoweringSpec):
            return spec
        return cls({name: LayerLowering(int(bits)) for name, bits in (spec or {}).items()})

    def layer_bits(self) -> dict[str, int]:
        """Module name -> bits (what an :class:`~autocompress.backends.base.Artifact` records)."""
        return {name: lay.bits for name, lay in self.layers.items()}

    def quantized(self) -> dict[str, int]:
        """Module name -> bits of the modules below float."""
        return {name: lay.bits for name, lay in self.layers.items() if lay.bits < FLOAT_BITS}

    def layer(self, name: str) -> LayerLowering:
        return self.layers.get(name, LayerLowering())

    def only(self, names) -> LoweringSpec:
        """The spec restricted to ``names`` (e.g. the 8-bit layers a converter takes)."""
        keep = set(names)
        return replace(self, layers={n: lay for n, lay in self.layers.items() if n in keep})

    def __bool__(self) -> bool:
        return bool(self.layers)
