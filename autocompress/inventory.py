"""Which layers of a model can be compressed, with their shapes, parameters and MACs."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

COMPRESSIBLE = (nn.Conv1d, nn.Conv2d, nn.Linear)


@dataclass(frozen=True)
class LayerInfo:
    """One compressible layer.

    Attributes:
        name: dotted module path (``features.3``), the stable key used in plans and parameter names.
        kind: ``Conv1d``, ``Conv2d`` or ``Linear``.
        in_features / out_features: input and output channels (or features).
        kernel: kernel size (1 for Linear).
        groups: conv groups (1 for Linear).
        params: weight + bias element count.
        macs: multiply-accumulates for one sample of the example input.
        full_rank: the largest rank a factorization of the weight can have.
    """

    name: str
    kind: str
    in_features: int
    out_features: int
    kernel: tuple[int, ...]
    groups: int
    params: int
    macs: int
    full_rank: int

    def to_dict(self) -> dict:
        return asdict(self)


def compressible_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every Conv1d/Conv2d/Linear, in definition order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, COMPRESSIBLE)]


def build_inventory(model: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> list[LayerInfo]:
    """Run one forward pass on ``example_inputs`` (batch 1 is used for MACs) and list the layers."""
    layers = compressible_layers(model)
    out_elems: dict[str, int] = {}
    hooks = []
    for name, module in layers:
        hooks.append(
            module.register_forward_hook(
                lambda _m, _i, out, name=name: out_elems.__setitem__(name, out[0].numel())
            )
        )
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(*[x[:1] for x in example_inputs])
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    inventory = []
    for name, m in layers:
        params = sum(p.numel() for p in m.parameters(recurse=False))
        if isinstance(m, nn.Linear):
            kind, c_in, c_out, kernel, groups = "Linear", m.in_features, m.out_features, (1,), 1
            per_output = m.in_features
        else:
            kind, c_in, c_out = type(m).__name__, m.in_channels, m.out_channels
            kernel, groups = tuple(m.kernel_size), m.groups
            per_output = (m.in_channels // m.groups) * int(torch.tensor(kernel).prod())
        macs = out_elems.get(name, 0) * per_output
        fan_in = m.weight[0].numel()
        inventory.append(
            LayerInfo(name, kind, c_in, c_out, kernel, groups, params, int(macs), min(c_out, fan_in))
        )
    return inventory
