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
from .tasks.data import IOSpec, select_output

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


class Inventory(list):
    """The inventory: a list of :class:`LayerInfo`, plus ``unused``: compressible layers left out
    because the model's selected output does not depend on their weights, e.g. the pooler of a Hugging
    Face encoder whose scored output is its token embeddings. Such a layer is not in the exported graph:
    nothing done to it could change the artifact."""

    def __init__(self, layers=(), unused: dict[str, str] | None = None):
        super().__init__(layers)
        self.unused: dict[str, str] = dict(unused or {})


UNUSED_REASON = "the scored output does not depend on its weights (not in the exported graph)"


def build_inventory(
    model: nn.Module, example_inputs: tuple[torch.Tensor, ...], io: IOSpec | None = None
) -> Inventory:
    """Run one forward (and backward) pass on ``example_inputs`` (batch 1 is used for MACs) and list
    the layers whose weights the selected output depends on.

    Args:
        model: the model as the user holds it.
        example_inputs: inputs in the io's order (only the first sample is used).
        io: how the model is called and which output is scored (default: positional inputs, the
            default output selector).
    """
    layers = compressible_layers(model)
    out_elems, used = _trace(model, layers, tuple(x[:1] for x in example_inputs), io)
    inventory, unused = [], {}
    for name, m in layers:
        if not used.get(name, True):
            unused[name] = UNUSED_REASON
            continue
        inventory.append(_info(name, m, out_elems.get(name, 0)))
    return Inventory(inventory, unused)


def _trace(
    model: nn.Module, layers: list[tuple[str, nn.Module]], inputs: tuple[torch.Tensor, ...], io: IOSpec | None
) -> tuple[dict[str, int], dict[str, bool]]:
    """One forward: each called layer's output size, and whether the selected output depends on each
    layer's weight (its gradient reaches the weight; a layer whose weight a parent reads directly, as
    ``nn.MultiheadAttention`` does its ``out_proj``, counts as used though it is never called)."""
    out_elems: dict[str, int] = {}

    def hook(name):
        def record(_m, _i, out):
            t = out[0] if isinstance(out, tuple | list) else out
            if torch.is_tensor(t):
                out_elems[name] = t[0].numel()

        return record

    hooks = [module.register_forward_hook(hook(name)) for name, module in layers]
    weights = [m.weight for _, m in layers]
    flags = [w.requires_grad for w in weights]
    was_training = model.training
    model.eval()
    try:
        for w in weights:
            w.requires_grad_(True)
        with torch.enable_grad():
            out = io.call(model, inputs) if io is not None else select_output(model(*inputs), None)
            if not (weights and out.requires_grad):  # e.g. a forward under no_grad: nothing to tell
                return out_elems, {}
            grads = torch.autograd.grad(out.float().sum(), weights, allow_unused=True)
    finally:
        for h in hooks:
            h.remove()
        for w, flag in zip(weights, flags, strict=True):
            w.requires_grad_(flag)
        model.train(was_training)
    return out_elems, {name: g is not None for (name, _), g in zip(layers, grads, strict=True)}


def _info(name: str, m: nn.Module, out_elems: int) -> LayerInfo:
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
    macs = out_elems * per_output
    fan_in = m.weight[0].numel()
    full_rank = min(m.weight.shape[0], fan_in)
    return LayerInfo(name, kind, c_in, c_out, kernel, groups, params, int(macs), full_rank)


def unused_lines(inventory: list[LayerInfo]) -> list[str]:
    """One log line per reason a compressible layer was left out of ``inventory`` (none when none)."""
    by_reason: dict[str, list[str]] = {}
    for name, why in getattr(inventory, "unused", {}).items():
        by_reason.setdefault(why, []).append(name)
    lines = []
    for why, names in by_reason.items():
        shown = ", ".join(names[:3]) + (f" (+{len(names) - 3} more)" if len(names) > 3 else "")
        lines.append(f"inventory: left out {shown}: {why}")
    return lines
