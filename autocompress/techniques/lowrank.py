"""Low-rank factorization of Linear, Conv1d and Conv2d layers.

Modes (``LayerPlan.rank_mode``):
- ``ratio``: channel SVD (k x k conv to ``rank`` channels, then 1x1), rank = ratio x full rank;
- ``energy``: channel SVD keeping the smallest rank whose singular values hold ``ratio`` of the
  weight's energy (sum of squared singular values);
- ``spatial``: spatial SVD of a Conv2d, a ``k x 1`` conv to ``rank`` channels then a ``1 x k`` conv;
- ``tucker``: Tucker-2 decomposition of a Conv2d (1x1 in, k x k core, 1x1 out; ranks = ratio x
  channels), computed by tensorly's ``partial_tucker``;
- ``cp``: CP (canonical polyadic) decomposition of a Conv2d kernel (Lebedev et al., 2015): 1x1 conv to
  ``rank`` channels, depthwise ``k x 1``, depthwise ``1 x k``, 1x1 conv to the outputs; rank = ratio x
  the layer's full rank ``min(out, in * kh * kw)``, computed by tensorly's ``parafac`` (CP-ALS).
A factorization that would not reduce MACs, or of a depthwise/grouped conv, is skipped with the reason.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from ..errors import MissingDependencyError, TechniqueError
from ..inventory import compressible_layers
from ..registry import TECHNIQUES, Dim, Probe, TechniqueSpec
from ._modules import set_module


def rank_for(ratio: float, full_rank: int) -> int:
    """Rank kept for ``ratio`` in (0, 1] of ``full_rank`` (at least 1)."""
    if not (0.0 < ratio <= 1.0):
        raise TechniqueError(f"rank ratio {ratio} is outside (0, 1]")
    return max(1, min(full_rank, round(ratio * full_rank)))


def _svd_factors(w2d: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``w2d ~= b @ a`` with ``a`` [rank, in] and ``b`` [out, rank]; singular values split evenly."""
    full = min(w2d.shape)
    if not (1 <= rank <= full):
        raise TechniqueError(f"rank {rank} is outside [1, {full}] for a {tuple(w2d.shape)} weight")
    u, s, vh = torch.linalg.svd(w2d.detach().double(), full_matrices=False)
    root = s[:rank].sqrt()
    a = (root[:, None] * vh[:rank]).to(w2d.dtype)
    b = (u[:, :rank] * root[None, :]).to(w2d.dtype)
    return a, b


def factorize_linear(layer: nn.Linear, rank: int) -> nn.Sequential:
    """``Linear(in, out)`` -> ``Linear(in, rank, bias=False)`` then ``Linear(rank, out)``."""
    a, b = _svd_factors(layer.weight, rank)
    first = nn.Linear(layer.in_features, rank, bias=False)
    second = nn.Linear(rank, layer.out_features, bias=layer.bias is not None)
    with torch.no_grad():
        first.weight.copy_(a)
        second.weight.copy_(b)
        if layer.bias is not None:
            second.bias.copy_(layer.bias)
    return nn.Sequential(first, second)


def factorize_conv(layer: nn.Conv1d | nn.Conv2d, rank: int) -> nn.Sequential:
    """Channel SVD: ``k x k`` conv to ``rank`` channels, then a 1x1 conv to the outputs."""
    if layer.groups != 1:
        raise TechniqueError(f"grouped/depthwise conv (groups={layer.groups}) cannot be SVD-factorized")
    if layer.padding_mode != "zeros":
        raise TechniqueError(f"padding_mode {layer.padding_mode!r} is not supported (only 'zeros')")
    conv = type(layer)
    w = layer.weight
    a, b = _svd_factors(w.reshape(w.shape[0], -1), rank)
    first = conv(
        layer.in_channels, rank, layer.kernel_size, layer.stride, layer.padding, layer.dilation, bias=False
    )
    second = conv(rank, layer.out_channels, 1, bias=layer.bias is not None)
    with torch.no_grad():
        first.weight.copy_(a.reshape(rank, *w.shape[1:]))
        second.weight.copy_(b.reshape(layer.out_channels, rank, *([1] * (w.dim() - 2))))
        if layer.bias is not None:
            second.bias.copy_(layer.bias)
    return nn.Sequential(first, second)


def factorize(layer: nn.Module, rank: int) -> nn.Sequential:
    """Factorize a Linear / Conv1d / Conv2d layer to ``rank``."""
    if isinstance(layer, nn.Linear):
        return factorize_linear(layer, rank)
    if isinstance(layer, nn.Conv1d | nn.Conv2d):
        return factorize_conv(layer, rank)
    raise TechniqueError(f"cannot factorize {type(layer).__name__} (only Linear, Conv1d, Conv2d)")


def factorized_macs(layer: nn.Module, rank: int) -> tuple[int, int]:
    """(original, factorized) MACs per output position: factorizing pays only if the second is smaller."""
    w = layer.weight
    out, fan_in = w.shape[0], w[0].numel()
    if isinstance(layer, nn.Conv1d | nn.Conv2d) and layer.groups != 1:
        return out * fan_in, math.inf  # never pays: cannot be factorized
    return out * fan_in, rank * (fan_in + out)


RANK_MODES = ("ratio", "energy", "spatial", "tucker", "cp")


def rank_for_energy(weight: torch.Tensor, energy: float) -> int:
    """Smallest rank whose singular values keep at least ``energy`` of ``sum(s^2)`` (channel SVD)."""
    if not (0.0 < energy <= 1.0):
        raise TechniqueError(f"kept energy {energy} is outside (0, 1]")
    s = torch.linalg.svdvals(weight.detach().reshape(weight.shape[0], -1).double())
    cum = torch.cumsum(s**2, 0) / (s**2).sum()
    return int(torch.searchsorted(cum, torch.tensor(energy - 1e-12, dtype=cum.dtype)).item()) + 1


def factorize_spatial(layer: nn.Conv2d, rank: int) -> nn.Sequential:
    """Spatial SVD: ``(kh x kw)`` conv -> ``(kh x 1)`` conv to ``rank`` channels, then ``(1 x kw)``."""
    if not isinstance(layer, nn.Conv2d) or layer.groups != 1:
        raise TechniqueError("spatial SVD needs a Conv2d with groups=1")
    out, c_in, kh, kw = layer.weight.shape
    # W'[(c, i), (o, j)] = W[o, c, i, j]
    w2d = layer.weight.detach().permute(1, 2, 0, 3).reshape(c_in * kh, out * kw)
    a, b = _svd_factors(w2d.T, rank)  # w2d.T ~= b @ a: b [out*kw, r], a [r, in*kh]
    (sh, sw), (ph, pw), (dh, dw) = layer.stride, layer.padding, layer.dilation
    first = nn.Conv2d(c_in, rank, (kh, 1), (sh, 1), (ph, 0), (dh, 1), bias=False)
    second = nn.Conv2d(rank, out, (1, kw), (1, sw), (0, pw), (1, dw), bias=layer.bias is not None)
    with torch.no_grad():
        first.weight.copy_(a.reshape(rank, c_in, kh, 1))
        second.weight.copy_(b.reshape(out, kw, rank).permute(0, 2, 1).reshape(out, rank, 1, kw))
        if layer.bias is not None:
            second.bias.copy_(layer.bias)
    return nn.Sequential(first, second)


def factorize_tucker(layer: nn.Conv2d, rank_in: int, rank_out: int) -> nn.Sequential:
    """Tucker-2 (tensorly ``partial_tucker`` over the channel modes): 1x1, k x k core, 1x1."""
    if not isinstance(layer, nn.Conv2d) or layer.groups != 1:
        raise TechniqueError("Tucker decomposition needs a Conv2d with groups=1")
    out, c_in = layer.weight.shape[:2]
    if not (1 <= rank_in <= c_in and 1 <= rank_out <= out):
        raise TechniqueError(f"Tucker ranks ({rank_in}, {rank_out}) are outside [1, {c_in}] x [1, {out}]")
    try:
        from tensorly.decomposition import partial_tucker
    except ImportError as exc:
        raise MissingDependencyError("Tucker decomposition needs tensorly: pip install tensorly") from exc
    w = layer.weight.detach().double().numpy()
    (core, (u_out, u_in)), _ = partial_tucker(
        w, rank=[rank_out, rank_in], modes=[0, 1], init="svd", random_state=0
    )
    first = nn.Conv2d(c_in, rank_in, 1, bias=False)
    middle = nn.Conv2d(
        rank_in, rank_out, layer.kernel_size, layer.stride, layer.padding, layer.dilation, bias=False
    )
    last = nn.Conv2d(rank_out, out, 1, bias=layer.bias is not None)
    dtype = layer.weight.dtype
    with torch.no_grad():
        first.weight.copy_(torch.from_numpy(u_in.T.copy()).to(dtype)[:, :, None, None])
        middle.weight.copy_(torch.from_numpy(core.copy()).to(dtype))
        last.weight.copy_(torch.from_numpy(u_out.copy()).to(dtype)[:, :, None, None])
        if layer.bias is not None:
            last.bias.copy_(layer.bias)
    return nn.Sequential(first, middle, last)


def factorize_cp(layer: nn.Conv2d, rank: int, n_iter_max: int = 200) -> nn.Sequential:
    """CP decomposition of a Conv2d kernel (tensorly ``parafac``, SVD init, deterministic).

    ``W[o, c, i, j] ~= sum_r A_out[o, r] A_in[c, r] A_h[i, r] A_w[j, r]`` becomes four convs:
    1x1 (in -> rank), depthwise ``kh x 1`` and ``1 x kw`` (stride, padding and dilation split by axis),
    1x1 (rank -> out, with the bias).
    """
    if not isinstance(layer, nn.Conv2d) or layer.groups != 1:
        raise TechniqueError("CP decomposition needs a Conv2d with groups=1")
    if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
        raise TechniqueError("CP decomposition needs numeric zero padding")
    if rank < 1:
        raise TechniqueError(f"CP rank {rank} must be >= 1")
    try:
        from tensorly.decomposition import parafac
    except ImportError as exc:
        raise MissingDependencyError("CP decomposition needs tensorly: pip install tensorly") from exc
    out, c_in, kh, kw = layer.weight.shape
    w = layer.weight.detach().double().numpy()
    with warnings.catch_warnings():  # ranks above a mode's size: tensorly fills the SVD init at random
        warnings.filterwarnings("ignore", message="Trying to compute SVD", category=UserWarning)
        weights, (a_out, a_in, a_h, a_w) = parafac(
            w, rank=rank, n_iter_max=n_iter_max, init="svd", tol=1e-10, random_state=0
        )
    (sh, sw), (ph, pw), (dh, dw) = layer.stride, layer.padding, layer.dilation
    first = nn.Conv2d(c_in, rank, 1, bias=False)
    vertical = nn.Conv2d(rank, rank, (kh, 1), (sh, 1), (ph, 0), (dh, 1), groups=rank, bias=False)
    horizontal = nn.Conv2d(rank, rank, (1, kw), (1, sw), (0, pw), (1, dw), groups=rank, bias=False)
    last = nn.Conv2d(rank, out, 1, bias=layer.bias is not None)
    dtype = layer.weight.dtype

    def t(a):
        return torch.from_numpy(a.copy()).to(dtype)

    with torch.no_grad():
        first.weight.copy_(t(a_in.T)[:, :, None, None])
        vertical.weight.copy_(t(a_h.T)[:, None, :, None])
        horizontal.weight.copy_(t(a_w.T)[:, None, None, :])
        last.weight.copy_((t(a_out) * t(weights)[None, :])[:, :, None, None])
        if layer.bias is not None:
            last.bias.copy_(layer.bias)
    return nn.Sequential(first, vertical, horizontal, last)


def cp_macs(layer: nn.Conv2d, rank: int) -> int:
    """MACs per output position of the CP-factorized layer: ``rank * (in + kh + kw + out)``."""
    out, c_in, kh, kw = layer.weight.shape
    return rank * (c_in + kh + kw + out)


def plan_factorization(layer: nn.Module, mode: str, ratio: float) -> tuple[nn.Sequential | None, str]:
    """The factorized replacement of ``layer`` for ``mode`` at ``ratio``, or None and the reason why not.

    A replacement is returned only when it has fewer MACs per output position than the layer.
    """
    if mode not in RANK_MODES:
        raise TechniqueError(f"unknown rank mode {mode!r}; known: {', '.join(RANK_MODES)}")
    if ratio >= 1.0:
        return None, "full rank"
    w = layer.weight
    out, fan_in = w.shape[0], w[0].numel()
    original = out * fan_in
    if isinstance(layer, nn.Conv1d | nn.Conv2d) and layer.groups != 1:
        return None, f"not factorized: depthwise/grouped conv (groups={layer.groups})"
    if mode in ("spatial", "tucker", "cp") and not (
        isinstance(layer, nn.Conv2d) and min(layer.kernel_size) > 1
    ):
        return None, f"not factorized: {mode} needs a Conv2d with a kernel larger than 1x1"
    if mode == "tucker":
        c_in, (kh, kw) = w.shape[1], layer.kernel_size
        r_in, r_out = rank_for(ratio, c_in), rank_for(ratio, out)
        macs = c_in * r_in + r_in * r_out * kh * kw + r_out * out
        if macs >= original:
            return (
                None,
                f"not factorized: Tucker ranks ({r_in}, {r_out}) give {macs} MACs >= original {original}",
            )
        return factorize_tucker(layer, r_in, r_out), f"tucker ranks ({r_in}, {r_out}) of ({c_in}, {out})"
    if mode == "cp":
        full = min(out, fan_in)
        rank = rank_for(ratio, full)
        macs = cp_macs(layer, rank)
        if macs >= original:
            return None, f"not factorized: CP rank {rank}/{full} gives {macs} MACs >= original {original}"
        return factorize_cp(layer, rank), f"cp rank {rank}/{full}"
    if mode == "spatial":
        c_in, (kh, kw) = w.shape[1], layer.kernel_size
        full = min(c_in * kh, out * kw)
        rank = rank_for(ratio, full)
        macs = rank * c_in * kh + out * rank * kw
        if macs >= original:
            return (
                None,
                f"not factorized: spatial rank {rank}/{full} gives {macs} MACs >= original {original}",
            )
        return factorize_spatial(layer, rank), f"spatial rank {rank}/{full}"
    full = min(out, fan_in)
    rank = rank_for_energy(w, ratio) if mode == "energy" else rank_for(ratio, full)
    macs = rank * (fan_in + out)
    if macs >= original:
        return None, f"rank {rank}/{full} not applied: factorized MACs {macs} >= original {original}"
    return factorize(layer, rank), f"rank {rank}/{full}" + (f" (energy {ratio})" if mode == "energy" else "")


# -- the technique: per-layer fields and the pipeline step ------------------------------------------
def _ratio_rule(v) -> str | None:
    ok = isinstance(v, int | float) and not isinstance(v, bool) and 0 < v <= 1
    return None if ok else "is outside (0, 1]"


def factorize_layers(build) -> None:
    """Apply the plan's ranks (pipeline order 20); ``build.origin``: effective module -> planned layer."""
    origin: dict[str, str] = {}
    for name, layer in compressible_layers(build.student):
        lp = build.plan.layer(name)
        new, why = plan_factorization(layer, lp.rank_mode, lp.rank_ratio)
        if new is None:
            if lp.rank_ratio < 1.0:
                build.notes[name] = why
            origin[name] = name
            continue
        set_module(build.student, name, new)
        for i in range(len(new)):
            origin[f"{name}.{i}"] = name
        build.notes[name] = why
    build.origin = origin


def probes(params: dict, info, allowed: dict) -> list[Probe]:
    """Applicability: each rank mode of the space at the lowest rank ratio it allows."""
    ratio = min(float(v) for v in params["rank_ratio"].values())
    if ratio >= 1.0:
        return []
    return [
        Probe(
            ("rank", mode, ratio),
            f"low rank ({mode})",
            "rank_mode",
            mode,
            f"rank_ratio {ratio:g}",
            {"rank_ratio": ratio, "rank_mode": str(mode)},
            skipped=("not factorized", "not applied"),
        )
        for mode in dict.fromkeys(params["rank_mode"].values())
    ]


def size_floor(params: dict, info, floor: dict) -> None:
    """SVD at the lowest rank ratio; with another rank mode, rank 1 (one element per input and output)."""
    ratio = min(float(r) for r in params["rank_ratio"].values())
    keep = floor["keep"]
    if {str(m) for m in params["rank_mode"].values()} - {"ratio"}:
        floor["elements"] = min(
            floor["elements"], (info.in_features // info.groups + info.out_features) * keep
        )
    elif ratio < 1.0:
        rank = rank_for(ratio, info.full_rank)
        floor["elements"] = min(floor["elements"], rank * (floor["fan_in"] + info.out_features) * keep)


SPEC = TechniqueSpec(
    "lowrank",
    dims=(
        Dim("rank_ratio", 1.0, short="rank", cast=float, check=_ratio_rule, order=40),
        Dim("rank_mode", "ratio", choices=RANK_MODES, order=50),
    ),
    steps=((20, factorize_layers),),
    probes=probes,
    collapse={"rank_mode": ("rank_ratio", 1.0)},  # no rank mode left: not factorized
    size_floor=size_floor,
)
TECHNIQUES.add(SPEC.name, SPEC)
