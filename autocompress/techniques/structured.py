"""Structured (channel / neuron) pruning that physically removes channels.

The dependency graph comes from torch-pruning (DepGraph): residual additions, concatenations,
depthwise convs and BatchNorm stay consistent because coupled layers are pruned as one group.
A layer's ``ratio`` is the fraction of its output channels removed; layers that produce the model's
output are never pruned (the output shape is the task's contract).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import MissingDependencyError, TechniqueError
from ..inventory import compressible_layers

IMPORTANCES = ("l1", "l2", "taylor")


def _tp():
    try:
        import torch_pruning
    except ImportError as exc:  # pragma: no cover - a core dependency
        raise MissingDependencyError(
            "structured pruning needs torch-pruning: pip install torch-pruning"
        ) from exc
    return torch_pruning


def output_layers(model: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> set[str]:
    """Compressible layers whose output tensor is returned by the model as is."""
    outs: dict[str, torch.Tensor] = {}
    hooks = [
        m.register_forward_hook(lambda _m, _i, o, n=n: outs.__setitem__(n, o))
        for n, m in compressible_layers(model)
    ]
    try:
        with torch.no_grad():
            result = model(*example_inputs)
    finally:
        for h in hooks:
            h.remove()
    return {n for n, o in outs.items() if o is result}


def prune_channels(
    model: nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    ratios: dict[str, float],
    *,
    importance: str = "l1",
    round_to: int | None = None,
    data: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, tuple[int, int]]:
    """Remove ``ratios[name]`` of each layer's output channels (in place).

    Args:
        model: the model (eval mode is restored afterwards).
        example_inputs: inputs for tracing the dependency graph.
        ratios: layer name -> fraction of output channels to remove, in [0, 1).
        importance: ``l1`` / ``l2`` weight magnitude, or ``taylor`` (first order, needs ``data``).
        round_to: keep channel counts a multiple of this (a backend preference, e.g. 8 or 16).
        data: ``(inputs, labels)`` for the Taylor score's gradient.

    Returns:
        layer name -> (output channels before, after) for every layer whose width changed.

    Raises:
        TechniqueError: unknown importance, a ratio outside [0, 1), or Taylor without data.
    """
    tp = _tp()
    if importance not in IMPORTANCES:
        raise TechniqueError(f"unknown importance {importance!r}; known: {', '.join(IMPORTANCES)}")
    modules = dict(model.named_modules())
    for name, r in ratios.items():
        if name not in modules:
            raise TechniqueError(f"no layer named {name!r} to prune")
        if not (0.0 <= r < 1.0):
            raise TechniqueError(f"channel pruning ratio {r} of {name!r} is outside [0, 1)")
    keep = output_layers(model, example_inputs)
    wanted = {modules[n]: r for n, r in ratios.items() if r > 0 and n not in keep}
    if not wanted:
        return {}
    imp = {
        "l1": lambda: tp.importance.GroupMagnitudeImportance(p=1),
        "l2": lambda: tp.importance.GroupMagnitudeImportance(p=2),
        "taylor": lambda: tp.importance.GroupTaylorImportance(),
    }[importance]()
    before = {n: _width(m) for n, m in compressible_layers(model)}
    pruner = tp.pruner.BasePruner(
        model,
        example_inputs,
        importance=imp,
        pruning_ratio=0.0,
        pruning_ratio_dict=wanted,
        ignored_layers=[modules[n] for n in keep],
        round_to=round_to,
    )
    if importance == "taylor":
        if data is None:
            raise TechniqueError("the taylor importance needs (inputs, labels) to compute gradients")
        model.zero_grad()
        nn.functional.cross_entropy(model(data[0]), data[1]).backward()
    pruner.step()
    model.zero_grad(set_to_none=True)
    model.eval()
    return {n: (before[n], _width(m)) for n, m in compressible_layers(model) if _width(m) != before.get(n)}


def _width(m: nn.Module) -> int:
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels
