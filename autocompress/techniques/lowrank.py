"""SVD (low-rank) factorization of Linear, Conv1d and Conv2d layers."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import TechniqueError


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
