"""Structural roles: the layers that are the same part of identical blocks (the six encoder layers of a
BERT, the inverted residuals of one MobileNet stage), so that what is checked or profiled on one of them
holds for all (:mod:`.applicability`, :mod:`.latency_profile`): the set-up cost grows with the model's
distinct structure, not with its depth.

A layer's *block* is the outermost module on its path that is a numbered child of a container
(``encoder.layer.3`` of ``encoder.layer.3.attention.self.query``) and has a sibling of the same
signature. A module's *signature* is its whole subtree: each submodule's relative name, class and
plain attributes (numbers, strings, booleans and tuples of them: stride, groups, eps, a residual flag),
and every parameter's and buffer's name, shape and dtype. Integer attributes named as positions
(``layer_idx``: a KV-cache slot) are left out, so that numbered copies compare equal. A layer's role is
its block's signature plus its path inside the block; a layer in no such block, and any layer whose
output is returned by the model as it is (it is the only one with that place in the data flow), is its
own role. Roles say nothing about the weights: two members of a role have the same shapes and code,
not the same values (what a role's check or profile row copies is what the structure decides: whether
a technique applies, the artifact's latency and size; the metric is the representative's, an estimate
for the other members, which the trials measure).

A result applies to another layer only where both the role and the setting are equal
(:func:`role_key`).
"""

from __future__ import annotations

import hashlib
import json
import re

import torch
from torch import nn

from ..tasks.data import deployable

_POSITION = re.compile(r"(^|_)(idx|index|layer_id|block_id)$")
_PLAIN = (bool, int, float, str, type(None))


def _plain(v) -> bool:
    return isinstance(v, _PLAIN) or (isinstance(v, tuple) and all(isinstance(x, _PLAIN) for x in v))


def signature(module: nn.Module) -> str:
    """A digest of ``module``'s subtree: classes, plain attributes, parameter and buffer shapes."""
    tree = []
    for name, sub in module.named_modules():
        attrs = sorted(
            (k, repr(v))
            for k, v in vars(sub).items()
            if not k.startswith("_") and k != "training" and _plain(v) and not _POSITION.search(k)
        )
        tree.append([name, f"{type(sub).__module__}.{type(sub).__qualname__}", attrs])
    tensors = [[n, list(t.shape), str(t.dtype)] for n, t in module.named_parameters()]
    tensors += [[n, list(t.shape), str(t.dtype)] for n, t in module.named_buffers()]
    blob = json.dumps([tree, tensors], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _output_layers(model: nn.Module, names: list[str], example_inputs, io) -> set[str]:
    """Layers whose output tensor is one the (deployed) model returns as it is."""
    outs: dict[str, object] = {}
    modules = dict(model.named_modules())
    hooks = [
        modules[n].register_forward_hook(lambda _m, _i, o, n=n: outs.__setitem__(n, o))
        for n in names
        if n in modules
    ]
    try:
        with torch.no_grad():
            result = deployable(model, io)(*example_inputs)
    finally:
        for h in hooks:
            h.remove()
    returned = [result] if isinstance(result, torch.Tensor) else _tensors(result)
    return {n for n, o in outs.items() if any(o is r for r in returned)}


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list | tuple):
        return [t for v in value for t in _tensors(v)]
    return []


def structural_roles(model: nn.Module, names: list[str], example_inputs=None, io=None) -> dict[str, str]:
    """``{layer: role}`` for the layers ``names`` of ``model`` (see the module doc): equal roles, equal
    structure. A layer in no repeated block gets its own name. With ``example_inputs`` (and the task's
    ``io``), a layer whose output the model returns as it is keeps its own name too."""
    modules = dict(model.named_modules())
    sigs: dict[str, str] = {}

    def sig(path: str) -> str:
        if path not in sigs:
            sigs[path] = signature(modules[path])
        return sigs[path]

    children: dict[str, list[str]] = {}
    for path in modules:
        parent, _, last = path.rpartition(".")
        if path and last.isdigit():
            children.setdefault(parent, []).append(path)
    alone = _output_layers(model, names, example_inputs, io) if example_inputs is not None else set()
    roles: dict[str, str] = {}
    for name in names:
        roles[name] = name
        if name in alone:
            continue
        parts = name.split(".")
        for i in range(1, len(parts)):  # outermost block first
            if not parts[i - 1].isdigit():
                continue
            block = ".".join(parts[:i])
            parent = block.rpartition(".")[0]
            if any(s != block and sig(s) == sig(block) for s in children.get(parent, [])):
                roles[name] = f"{sig(block)}:{'.'.join(parts[i:])}"
                break
    return roles


def role_key(roles: dict[str, str], layers: dict[str, object]) -> str:
    """What makes two changes the same experiment on the structure: each changed layer's role and its
    setting (``layers``: layer -> fields or a :class:`~autocompress.plan.LayerPlan`)."""
    items = sorted([roles.get(n, n), v.to_dict() if hasattr(v, "to_dict") else v] for n, v in layers.items())
    return json.dumps(items, sort_keys=True, default=str)
