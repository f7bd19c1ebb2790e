"""Fold BatchNorm into the preceding conv / linear layer (before export)."""

from __future__ import annotations

import torch.fx
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from ..registry import TECHNIQUES, TechniqueSpec
from ._modules import get_module, set_module

_BN = (nn.BatchNorm1d, nn.BatchNorm2d)
_FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Linear)


def _pairs_fx(model: nn.Module) -> list[tuple[str, str]]:
    """(layer, bn) pairs where the BN's only input is the layer and the layer feeds only the BN."""
    graph = torch.fx.symbolic_trace(model).graph
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(get_module(model, node.target), _BN):
            continue
        src = node.args[0]
        if (
            isinstance(src, torch.fx.Node)
            and src.op == "call_module"
            and isinstance(get_module(model, src.target), _FOLDABLE)
            and len(src.users) == 1
        ):
            pairs.append((src.target, node.target))
    return pairs


def _pairs_sequential(model: nn.Module) -> list[tuple[str, str]]:
    """Fallback for models fx cannot trace: adjacent (layer, BN) inside nn.Sequential containers."""
    pairs = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Sequential):
            kids = list(module.named_children())
            for (n1, m1), (n2, m2) in zip(kids, kids[1:], strict=False):
                if isinstance(m1, _FOLDABLE) and isinstance(m2, _BN):
                    prefix = f"{name}." if name else ""
                    pairs.append((prefix + n1, prefix + n2))
    return pairs


def fold_batchnorm(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """Fold every BN that directly follows a conv/linear into it; the BN becomes Identity.

    Returns the model (changed in place, in eval mode) and the names of the folded layers.
    """
    model.eval()
    try:
        pairs = _pairs_fx(model)
    except Exception:  # untraceable control flow: fall back to Sequential adjacency
        pairs = _pairs_sequential(model)
    for layer_name, bn_name in pairs:
        layer, bn = get_module(model, layer_name), get_module(model, bn_name)
        fuse = fuse_linear_bn_eval if isinstance(layer, nn.Linear) else fuse_conv_bn_eval
        set_module(model, layer_name, fuse(layer, bn))
        set_module(model, bn_name, nn.Identity())
    return model, [p[0] for p in pairs]


def fold_step(build) -> None:
    """Pipeline order 0: BatchNorm folded into the layer before it."""
    build.student, _ = fold_batchnorm(build.student)


SPEC = TechniqueSpec("fold", steps=((0, fold_step),))
TECHNIQUES.add(SPEC.name, SPEC)
