"""Depthwise-separable substitution: a standard ``k x k`` Conv2d replaced by a depthwise ``k x k`` conv and a
pointwise 1x1 conv (the MobileNet block), initialised from the teacher's kernel without data.

Per-layer field (Optuna parameter ``sep.<layer>``): ``separable``, the depthwise channel multiplier ``m``:
0 (off, the default: the hands-off space never substitutes), 1, 2 or 4. With ``m`` the layer
``Conv2d(C_in, C_out, k, stride, padding, dilation)`` becomes

- ``Conv2d(C_in, m * C_in, k, stride, padding, dilation, groups=C_in, bias=False)`` (depthwise), then
- ``Conv2d(m * C_in, C_out, 1)`` (pointwise, carrying the layer's bias).

The initialisation (:func:`separable_split`): the conv's output is ``sum_c W[:, c] * x_c``, each input
channel ``c`` contributing through its own ``C_out x k^2`` slice ``W[:, c]``; the substituted layer
computes the same sum with that slice replaced by ``P_c D_c`` (``P_c``: the ``m`` pointwise columns of
channel ``c``, ``D_c``: its ``m`` depthwise kernels flattened). The best ``P_c D_c`` of rank ``m`` in the
least-squares (Frobenius) sense is the truncated SVD of ``W[:, c] = U S V^T`` (Eckart-Young): depthwise
kernels ``sqrt(s_j) v_j`` reshaped ``k x k``, pointwise columns ``sqrt(s_j) u_j``, ``j < m``. With
``m = 1`` this is the least-squares optimum of the rank-1 split; the kernel's squared error is the sum of
the discarded squared singular values of every slice, and the split is exact where each slice has rank
at most ``m`` (a kernel that is separable by construction). The slices are independent, so the optimum
of the whole kernel is the optimum of each slice.

Eligible layers: ``nn.Conv2d`` with ``groups == 1`` and a kernel of more than one element, where the
substitution has fewer MACs per output position (``m * C_in * (k^2 + C_out) < C_in * C_out * k^2``).
Any other layer planned with ``separable > 0`` is left as it is, with a note saying why (``not
separable: ...``): the applicability check reads it as "no effect" and removes the choice from that
layer's domain before the search. ``separable`` and low rank on one layer are two replacements of the
same kernel: the space asks ``separable`` only where ``rank_ratio`` is 1.0, and a plan with both is
refused with one line.

Pipeline step (order 21, right after low rank): the layers are replaced, the effective names become
``<layer>.0`` (depthwise) and ``<layer>.1`` (pointwise), both carrying the layer's plan (bits, sparsity,
sharing apply to each factor, as to a factorized layer's). The substitution removes weights, so a
hands-off study fine-tunes the plan with KD (:mod:`autocompress.finetune_policy`: ``recoverable``).
Lowering needs nothing of the backend: the ONNX graph holds a ``Conv`` with ``group = C_in`` (ORT's
depthwise kernel) and a 1x1 ``Conv`` (its pointwise GEMM), quantized like any conv.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import ConfigError, TechniqueError
from ..registry import TECHNIQUES, Dim, Probe, TechniqueSpec
from ._build import Build
from ._modules import get_module, set_module

MULTIPLIERS = (0, 1, 2, 4)  # 0: not substituted
SKIPPED = "not separable"  # the note fragment of a layer left as it is


def separable_macs(layer: nn.Conv2d, multiplier: int) -> tuple[int, int]:
    """(original, substituted) MACs per output position of ``layer`` with depthwise multiplier ``m``."""
    out, c_in, kh, kw = layer.weight.shape
    return out * c_in * kh * kw, multiplier * c_in * (kh * kw + out)


def why_not_separable(layer: nn.Module, multiplier: int) -> str | None:
    """Why ``layer`` is not substituted at ``multiplier`` (a note starting ``not separable``), None if it is."""
    if not isinstance(layer, nn.Conv2d) or type(layer).forward is not nn.Conv2d.forward:
        return f"{SKIPPED}: {type(layer).__name__} (only a standard nn.Conv2d is)"
    if layer.groups != 1:
        return f"{SKIPPED}: depthwise/grouped conv (groups={layer.groups})"
    if math.prod(layer.kernel_size) == 1:
        return f"{SKIPPED}: a 1x1 kernel is already pointwise"
    original, substituted = separable_macs(layer, multiplier)
    if substituted >= original:
        return f"{SKIPPED}: multiplier {multiplier} gives {substituted} MACs >= original {original}"
    return None


def separable_split(layer: nn.Conv2d, multiplier: int = 1) -> nn.Sequential:
    """``layer`` as ``Sequential(depthwise k x k, pointwise 1x1)``, initialised by the truncated SVD of each
    input channel's ``C_out x k^2`` slice (the least-squares optimum of the split; see the module docstring).

    Raises:
        TechniqueError: ``layer`` is not a standard Conv2d with ``groups == 1``, or ``multiplier < 1``.
    """
    if not isinstance(layer, nn.Conv2d) or layer.groups != 1:
        raise TechniqueError("a depthwise-separable split needs an nn.Conv2d with groups=1")
    if multiplier < 1:
        raise TechniqueError(f"depthwise multiplier {multiplier} must be >= 1")
    w = layer.weight.detach()
    out, c_in, kh, kw = w.shape
    m = multiplier
    slices = w.double().reshape(out, c_in, kh * kw).permute(1, 0, 2)  # [C_in, C_out, k^2]
    u, s, vh = torch.linalg.svd(slices, full_matrices=False)
    r = min(m, s.shape[1])  # more channels than the slice's rank: the rest start at zero
    root = s[:, :r].sqrt()
    dw = torch.zeros(c_in, m, kh * kw, dtype=torch.float64, device=w.device)
    pw = torch.zeros(out, c_in, m, dtype=torch.float64, device=w.device)
    dw[:, :r] = root[..., None] * vh[:, :r]
    pw[:, :, :r] = (u[:, :, :r] * root[:, None, :]).permute(1, 0, 2)
    like = {"device": w.device, "dtype": w.dtype}
    depthwise = nn.Conv2d(
        c_in,
        c_in * m,
        layer.kernel_size,
        layer.stride,
        layer.padding,
        layer.dilation,
        groups=c_in,
        bias=False,
        padding_mode=layer.padding_mode,
        **like,
    )
    pointwise = nn.Conv2d(c_in * m, out, 1, bias=layer.bias is not None, **like)
    with torch.no_grad():
        depthwise.weight.copy_(dw.reshape(c_in * m, 1, kh, kw).to(w.dtype))
        pointwise.weight.copy_(pw.reshape(out, c_in * m, 1, 1).to(w.dtype))
        if layer.bias is not None:
            pointwise.bias.copy_(layer.bias)
    return nn.Sequential(depthwise, pointwise)


def separable_kernel(split: nn.Sequential) -> torch.Tensor:
    """The dense ``C_out x C_in x k x k`` kernel a ``Sequential(depthwise, pointwise)`` computes."""
    depthwise, pointwise = split
    c_in = depthwise.in_channels
    m = depthwise.out_channels // c_in
    d = depthwise.weight.reshape(c_in, m, -1)  # [C_in, m, k^2]
    p = pointwise.weight.reshape(pointwise.out_channels, c_in, m)
    return torch.einsum("ocj,cjk->ock", p, d).reshape(-1, c_in, *depthwise.kernel_size)


def substitute(build: Build) -> None:
    """Pipeline step (order 21): replace the planned layers; ``build.origin`` gets their two factors."""
    origin: dict[str, str] = {}
    changed = False
    for name, layer in build.layers().items():
        m = build.plan.layer(layer).separable
        if m == 0 or name != layer:  # not planned, or already factorized by low rank
            origin[name] = layer
            continue
        module = get_module(build.student, name)
        why = why_not_separable(module, m)
        if why is not None:
            build.note(layer, why)
            origin[name] = layer
            continue
        original, substituted = separable_macs(module, m)
        set_module(build.student, name, separable_split(module, m))
        origin[f"{name}.0"] = origin[f"{name}.1"] = layer
        build.note(layer, f"depthwise-separable x{m}: MACs {original} -> {substituted}")
        changed = True
    if changed:
        build.origin, build._modules = origin, None


def check_layer(lp, where: str) -> None:
    if lp.separable > 0 and lp.rank_ratio < 1.0:
        raise ConfigError(
            f"separable {lp.separable} and rank_ratio {lp.rank_ratio:g} both replace the layer's kernel: "
            "set one of them (separable 0 or rank_ratio 1.0)",
            field=f"{where}.separable",
        )


def _not_factorized(values: dict) -> bool:
    return float(values.get("rank_ratio", 1.0)) >= 1.0


def probes(params: dict, info, allowed: dict) -> list[Probe]:
    """Applicability: each multiplier of the space (the ineligible layers say why: no effect)."""
    return [
        Probe(
            ("separable", m),
            "depthwise-separable",
            "separable",
            m,
            f"separable {m}",
            {"separable": m},
            skipped=(SKIPPED,),
        )
        for m in sorted({int(v) for v in params["separable"].values()} - {0})
    ]


def size_floor(params: dict, info, floor: dict) -> None:
    """Substituted at the smallest multiplier: ``m * C_in * (k^2 + C_out)`` elements (after pruning)."""
    ms = [int(v) for v in params["separable"].values() if int(v) > 0]
    k2 = math.prod(info.kernel)
    if not ms or info.kind != "Conv2d" or info.groups != 1 or k2 == 1:
        return
    keep = floor["keep"]
    c_in, out = info.in_features * keep, info.out_features * keep
    floor["elements"] = min(floor["elements"], min(ms) * c_in * (k2 + out))


SPEC = TechniqueSpec(
    "depthwise_separable",
    dims=(
        Dim(
            "separable",
            0,
            short="sep",
            cast=int,
            choices=MULTIPLIERS,
            order=60,
            asked=_not_factorized,
            kinds=("Conv2d",),
        ),
    ),
    steps=((21, substitute),),
    check_layer=check_layer,
    probes=probes,
    collapse={"separable": ("separable", 0)},
    size_floor=size_floor,
)
TECHNIQUES.add(SPEC.name, SPEC)
