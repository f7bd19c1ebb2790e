"""The technique conformance suite's checks of weight sharing (with sparse storage) and of the
depthwise-separable substitution: what must hold of the compressed model and its artifact.

The checks take a :class:`~autocompress.testing.technique_suite.TechniqueCase` (this module does not
import that one: the suite imports these).
"""

from __future__ import annotations

import onnx
import torch
from torch import nn

from ..inventory import matmul_layers
from ..techniques._modules import get_module
from ..techniques.depthwise_separable import separable_macs, why_not_separable
from ._check import check


def check_shared(case, bits: int, pruned: bool = False) -> None:
    """Each layer holds at most ``2**bits`` distinct nonzero values (``pruned``: and exactly its planned
    share of zeros, stored sparse) and is rebuilt from its codebook in the ONNX file (the artifact's meta
    says how each was stored)."""
    stored = case.artifact.meta.get("compact_weights", {}) if case.artifact.path.suffix == ".onnx" else None
    for name, m in matmul_layers(case.model):
        w = m.weight.detach()
        check(len(torch.unique(w[w != 0])) <= 2**bits, (name, len(torch.unique(w[w != 0]))))
        if pruned:
            check(int((w == 0).sum()) == round(case.plan.layer(name).sparsity * w.numel()), name)
            check(stored is None or stored[name]["format"] in ("bitmask", "relative"), (name, stored))
        check(case.out.lowering.layer(name).shared is not None, name)
        check(stored is None or name in stored, (name, stored))


def check_separable(case) -> None:
    """Each planned Conv2d is a depthwise k x k conv (``groups = C_in``, the layer's stride, padding and
    dilation) then a 1x1 conv, with the MACs its note states, or the note is true of the layer; the ONNX
    graph has one grouped ``Conv`` per depthwise conv of the model."""
    for name, layer in matmul_layers(case.teacher):
        m = case.plan.layer(name).separable
        if m == 0:
            continue
        now, note = get_module(case.model, name), case.out.notes.get(name, "")
        if not isinstance(now, nn.Sequential):
            check(note == why_not_separable(layer, m), (name, note))
            continue
        dw, pw = now
        c_in, geometry = layer.in_channels, ("kernel_size", "stride", "padding", "dilation")
        check(dw.groups == c_in and dw.out_channels == m * c_in, (name, dw))
        check(all(getattr(dw, k) == getattr(layer, k) for k in geometry), (name, dw, layer))
        check(pw.kernel_size == (1, 1) and pw.out_channels == layer.out_channels, (name, pw))
        original, substituted = separable_macs(layer, m)
        check(note == f"depthwise-separable x{m}: MACs {original} -> {substituted}", (name, note))
    if case.artifact.path.suffix == ".onnx":
        graph = onnx.load(str(case.artifact.path)).graph
        grouped = [
            n.name
            for n in graph.node
            if n.op_type in ("Conv", "QLinearConv")
            and any(a.name == "group" and a.i > 1 for a in n.attribute)
        ]
        wanted = [n for n, mod in matmul_layers(case.model) if isinstance(mod, nn.Conv2d) and mod.groups > 1]
        check(len(grouped) == len(wanted), (grouped, wanted))
