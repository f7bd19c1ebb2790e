"""Which layers of a model can be compressed, with their shapes, parameters and MACs.

Two families: the matmul layers (``Conv1d``, ``Conv2d``, ``Linear``), which every technique may change,
and the embedding tables (``nn.Embedding``, e.g. a BERT's word, position and token-type embeddings): a
lookup, not a matmul, whose only choice is its weight's bits (weight-only, stored packed). Each
per-layer field of a technique says which kinds it applies to (:attr:`autocompress.registry.Dim.kinds`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from .registry import LAYER_KINDS, MATMUL_KINDS  # noqa: F401 - re-exported

MATMUL = (nn.Conv1d, nn.Conv2d, nn.Linear)
EMBEDDING = (nn.Embedding,)
COMPRESSIBLE = (*MATMUL, *EMBEDDING)


@dataclass(frozen=True)
class LayerInfo:
    """One compressible layer.

    Attributes:
        name: dotted module path (``features.3``), the stable key used in plans and parameter names.
        kind: ``Conv1d``, ``Conv2d``, ``Linear`` or ``Embedding`` (:func:`layer_kind`).
        in_features / out_features: input and output channels (or features); an embedding table maps
            ``num_embeddings`` rows (in) to ``embedding_dim`` features (out).
        kernel: kernel size (1 for Linear and Embedding).
        groups: conv groups (1 for Linear and Embedding).
        params: weight + bias element count.
        macs: multiply-accumulates for one sample of the example input (0 for a lookup).
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


def layer_kind(module: nn.Module) -> str | None:
    """The inventory kind of ``module`` (subclasses count as their base), None when it is not compressible.

    An ``nn.Embedding`` with ``max_norm`` is not: its forward renormalizes the table in place.
    """
    if isinstance(module, nn.Linear):
        return "Linear"
    if isinstance(module, nn.Conv2d):
        return "Conv2d"
    if isinstance(module, nn.Conv1d):
        return "Conv1d"
    if isinstance(module, nn.Embedding) and module.max_norm is None:
        return "Embedding"
    return None


def compressible_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every Conv1d/Conv2d/Linear and embedding table, in definition order."""
    return [(n, m) for n, m in model.named_modules() if layer_kind(m) is not None]


def matmul_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every Conv1d/Conv2d/Linear (no embedding tables), in definition order."""
    return [(n, m) for n, m in model.named_modules() if layer_kind(m) in MATMUL_KINDS]


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
        kind = layer_kind(m)
        if kind == "Embedding":  # a lookup: no multiply-accumulates
            c_in, c_out, kernel, groups, per_output = m.num_embeddings, m.embedding_dim, (1,), 1, 0
        elif kind == "Linear":
            c_in, c_out, kernel, groups = m.in_features, m.out_features, (1,), 1
            per_output = m.in_features
        else:
            c_in, c_out = m.in_channels, m.out_channels
            kernel, groups = tuple(m.kernel_size), m.groups
            per_output = (m.in_channels // m.groups) * int(torch.tensor(kernel).prod())
        macs = out_elems.get(name, 0) * per_output
        fan_in = m.weight[0].numel()
        full_rank = min(m.weight.shape[0], fan_in)
        inventory.append(LayerInfo(name, kind, c_in, c_out, kernel, groups, params, int(macs), full_rank))
    return inventory
