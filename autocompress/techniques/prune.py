"""Unstructured magnitude pruning with masks that follow a schedule during fine-tuning."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import TechniqueError


def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Mask with exactly ``round(sparsity * numel)`` zeros at the smallest ``|weight|``.

    Ties are broken by position (stable sort), so the result is deterministic.
    """
    if not (0.0 <= sparsity < 1.0):
        raise TechniqueError(f"sparsity {sparsity} is outside [0, 1)")
    n = weight.numel()
    k = int(round(sparsity * n))
    mask = torch.ones(n, dtype=weight.dtype, device=weight.device)
    if k:
        order = torch.argsort(weight.detach().abs().flatten(), stable=True)
        mask[order[:k]] = 0
    return mask.view_as(weight)


class Mask(nn.Module):
    """Parametrization ``weight -> weight * mask``; pruned weights get no gradient."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", torch.ones_like(weight))
        self.sparsity = 0.0

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.mask


def _mask_of(module: nn.Module) -> Mask | None:
    if not parametrize.is_parametrized(module, "weight"):
        return None
    return next((p for p in module.parametrizations.weight if isinstance(p, Mask)), None)


def apply_masks(modules: dict[str, nn.Module]) -> None:
    """Put a (still dense) mask on each module's weight; call before any other parametrization."""
    for module in modules.values():
        if _mask_of(module) is None:
            parametrize.register_parametrization(module, "weight", Mask(module.weight))


@torch.no_grad()
def set_sparsity(module: nn.Module, sparsity: float) -> None:
    """Raise the module's mask to ``sparsity``, ranking the currently *masked* weights.

    Already pruned weights are zero in that ranking, so sparsity only grows: a weight once pruned
    stays pruned, whatever the optimizer's momentum does to the stored value.
    """
    mask = _mask_of(module)
    if mask is None:
        raise TechniqueError("module has no mask: call apply_masks first")
    effective = module.parametrizations.weight.original * mask.mask
    mask.mask.copy_(magnitude_mask(effective, sparsity))
    mask.sparsity = sparsity


def sparsity_of(weight: torch.Tensor) -> float:
    """Fraction of exactly-zero entries."""
    return float((weight == 0).sum()) / weight.numel()


def nm_mask(weight: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """N:M semi-structured mask: in every ``m`` consecutive input weights, the ``n`` smallest are zero.

    Groups run along the input channels (the layout sparse tensor cores use): for a conv weight
    ``[out, in, kh, kw]`` each group is ``m`` input channels at one kernel position.
    """
    if not (0 < n < m):
        raise TechniqueError(f"N:M sparsity needs 0 < N < M, got {n}:{m}")
    c_in = weight.shape[1]
    if c_in % m:
        raise TechniqueError(f"{n}:{m} sparsity needs input channels divisible by {m}, got {c_in}")
    w = weight.detach().abs()
    w = w.movedim(1, -1) if w.dim() > 2 else w  # [..., in]
    groups = w.reshape(-1, m)
    drop = torch.argsort(groups, dim=1, stable=True)[:, :n]
    mask = torch.ones_like(groups).scatter_(1, drop, 0.0)
    mask = mask.reshape(w.shape)
    return (mask.movedim(-1, 1) if weight.dim() > 2 else mask).to(weight.dtype).contiguous()


@torch.no_grad()
def set_nm(module: nn.Module, n: int = 2, m: int = 4) -> None:
    """Put the module's mask to the N:M pattern of its current (masked) weight."""
    mask = _mask_of(module)
    if mask is None:
        raise TechniqueError("module has no mask: call apply_masks first")
    effective = module.parametrizations.weight.original * mask.mask
    mask.mask.copy_(nm_mask(effective, n, m))
    mask.sparsity = n / m
