"""Structured (channel / neuron) pruning that physically removes channels.

The dependency graph comes from torch-pruning (DepGraph): residual additions, concatenations,
depthwise convs and BatchNorm stay consistent because coupled layers are pruned as one group.
A layer's ``ratio`` is the fraction of its output channels removed; layers that produce the model's
output are never pruned (the output shape is the task's contract).
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import MissingDependencyError, TechniqueError
from ..inventory import matmul_layers
from .prune import Mask

IMPORTANCES = ("l1", "l2", "taylor")
# module type -> factory of a torch-pruning pruner for it: modules of this package that torch-pruning
# does not know (e.g. the attention heads pruning leaves) register how their channels go
CUSTOM_PRUNERS: dict[type, object] = {}


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
        for n, m in matmul_layers(model)
    ]
    try:
        with torch.no_grad():
            result = model(*example_inputs)
    finally:
        for h in hooks:
            h.remove()
    return {n for n, o in outs.items() if o is result}


def _pruner(model, example_inputs, wanted: dict, ignored: list, importance: str, round_to: int | None):
    """torch-pruning's pruner for ``wanted`` (module -> ratio), with this package's custom pruners."""
    tp = _tp()
    imp = {
        "l1": lambda: tp.importance.GroupMagnitudeImportance(p=1),
        "l2": lambda: tp.importance.GroupMagnitudeImportance(p=2),
        "taylor": lambda: tp.importance.GroupTaylorImportance(),
    }[importance]()
    with warnings.catch_warnings():
        # free parameters (e.g. a transformer's position embedding) follow the pruned width along their
        # last axis, which is what they need; torch-pruning warns about it for every graph it builds
        warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
        return tp.pruner.BasePruner(
            model,
            example_inputs,
            importance=imp,
            pruning_ratio=0.0,
            pruning_ratio_dict=wanted,
            ignored_layers=ignored,
            round_to=round_to,
            customized_pruners={t: make() for t, make in CUSTOM_PRUNERS.items()} or None,
        )


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
    _tp()  # a missing torch-pruning is reported before anything else
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
    before = {n: _width(m) for n, m in matmul_layers(model)}
    names = ", ".join(sorted(n for n, m in modules.items() if m in wanted))
    shapes = _output_shapes(model, example_inputs)
    try:
        pruner = _pruner(model, example_inputs, wanted, [modules[n] for n in keep], importance, round_to)
    except (IndexError, KeyError, ValueError, RuntimeError) as exc:  # torch-pruning's graph of the model
        raise _untraceable(names, exc) from exc
    if importance == "taylor":
        if data is None:
            raise TechniqueError("the taylor importance needs (inputs, labels) to compute gradients")
        model.zero_grad()
        inputs = data[0] if isinstance(data[0], tuple) else (data[0],)
        out = model(*inputs)
        if data[1] is not None and not data[1].is_floating_point():
            nn.functional.cross_entropy(out, data[1]).backward()
        else:  # no class labels: the gradient of the output's energy
            out.float().pow(2).mean().backward()
    try:
        pruner.step()
    except (IndexError, KeyError, ValueError, RuntimeError) as exc:
        raise _untraceable(names, exc) from exc
    model.zero_grad(set_to_none=True)
    model.eval()
    try:
        with torch.no_grad():
            model(*example_inputs)
    except RuntimeError as exc:  # e.g. attention projections: the graph knows nothing of the heads
        raise TechniqueError(
            f"structured pruning of {names} broke the model's forward pass ({str(exc).splitlines()[0]}); "
            "keep such layers (e.g. attention projections) to unstructured sparsity"
        ) from exc
    now = _output_shapes(model, example_inputs)
    if now != shapes:  # e.g. a layer writing a residual stream that a pooled embedding is taken from
        raise TechniqueError(
            f"structured pruning of {names} changed the model's output shape {shapes} -> {now}: their "
            "channels reach the output (a residual stream); keep such layers to unstructured sparsity"
        )
    return {n: (before[n], _width(m)) for n, m in matmul_layers(model) if _width(m) != before.get(n)}


def _output_shapes(model: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> list[list[int]]:
    """The shapes of the tensors the model returns (nested outputs flattened, in order); run in eval
    mode (a forward in training mode would move BatchNorm's running statistics)."""
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(*example_inputs)
    finally:
        model.train(training)
    flat = torch.utils._pytree.tree_leaves(out)
    return [list(t.shape) for t in flat if isinstance(t, torch.Tensor)]


def _untraceable(names: str, exc: BaseException) -> TechniqueError:
    """torch-pruning failed on the model's dependency graph: what could not be pruned, and why."""
    first = (str(exc).strip().splitlines() or [""])[0]
    return TechniqueError(
        f"structured pruning of {names}: torch-pruning could not follow the channels through the model's "
        f"graph ({type(exc).__name__}: {first}); an axis reshaped or transposed between layers (e.g. an "
        "MLP-Mixer's token mixing) ties channels it cannot trace: keep such layers to unstructured sparsity"
    )


def _width(m: nn.Module) -> int:
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels


def target_width(width: int, ratio: float, round_to: int | None = None) -> int:
    """Output channels kept when ``ratio`` of ``width`` is removed, by torch-pruning's rule.

    ``int(width * (1 - ratio))``, then rounded down to a multiple of ``round_to`` but never below one
    multiple (or one channel); a ratio of 0 keeps the layer as it is (no rounding).
    """
    if not (0.0 <= ratio < 1.0):
        raise TechniqueError(f"channel pruning ratio {ratio} is outside [0, 1)")
    if ratio == 0.0:
        return width
    keep = int(width * (1.0 - ratio))
    if round_to:
        keep -= keep % round_to
    return min(width, max(keep, round_to or 1))


def prune_to_widths(
    model: nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    widths: dict[str, int],
    *,
    importance: str = "l1",
    round_to: int | None = None,
    data: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, tuple[int, int]]:
    """Prune each named layer down to ``widths[name]`` output channels (one step of iterative pruning).

    Layers already at or below their width are left alone. The ratio handed to torch-pruning is the one
    that lands on the exact width from the current one (a fresh dependency graph each call, so earlier
    physical changes are seen). Returns layer name -> (before, after) like :func:`prune_channels`.
    """
    modules = dict(model.named_modules())
    ratios = {}
    for name, keep in widths.items():
        if name not in modules:
            raise TechniqueError(f"no layer named {name!r} to prune")
        current = _width(modules[name])
        if keep < 1:
            raise TechniqueError(f"{name!r}: cannot keep {keep} output channels (at least 1)")
        if keep < current:
            # torch-pruning keeps int(current * (1 - ratio)) channels: aim half a channel above to be exact
            ratios[name] = (current - keep - 0.5) / current
    if not ratios:
        return {}
    return prune_channels(model, example_inputs, ratios, importance=importance, round_to=round_to, data=data)


@contextlib.contextmanager
def bare_weights(model: nn.Module):
    """Take the weight parametrizations (masks, fake quantization) off every module for the block,
    then put them back: torch-pruning can only resize plain parameters.

    Masks are baked in (pruned weights stored as zeros) and rebuilt afterwards from the zeros of the
    possibly smaller weight; LSQ quantizers whose per-channel steps no longer match the weight are
    rebuilt from it; other parametrizations are registered again as the same objects. Parameters are new objects afterwards: rebuild the optimizer.
    """
    records = []
    for m in model.modules():
        if not parametrize.is_parametrized(m, "weight"):
            continue
        plist = list(m.parametrizations.weight)
        with torch.no_grad():
            for p in plist:
                if isinstance(p, Mask):
                    m.parametrizations.weight.original.mul_(p.mask)
        parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)
        records.append((m, plist))
    try:
        yield
    finally:
        for m, plist in records:
            for p in plist:
                if isinstance(p, Mask):
                    fresh = Mask(m.weight)
                    with torch.no_grad():
                        fresh.mask.copy_((m.weight != 0).to(fresh.mask.dtype))
                    fresh.sparsity = p.sparsity
                    p = fresh
                elif getattr(p, "lsq", False) and p.scale.shape[0] not in (1, m.weight.shape[0]):
                    # per-channel learned steps of removed channels are gone: start the layer's steps
                    # again from the min-max rule of its smaller weight
                    p = type(p)(m.weight.detach(), p.bits, p.reduce_range, p.scheme, p.granularity)
                parametrize.register_parametrization(m, "weight", p)


class ChannelSchedule:
    """Iterative structured pruning: each layer's width follows a sparsity schedule during fine-tuning.

    ``final`` maps layer names to the fraction of output channels removed at the end; at ``progress``
    the fraction is ``schedules.sparsity_at(kind, final, start, end, progress, steps)`` and the width is
    :func:`target_width` of the layer's initial width, so the last step lands on exactly the width a
    one-shot prune gives. :meth:`step` removes channels physically (torch-pruning, a fresh dependency
    graph each time) whenever a layer is wider than its target; the caller rebuilds its optimizer when
    it returns changes. Layers producing the model output are left out (see :func:`output_layers`).
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs: tuple[torch.Tensor, ...],
        final: dict[str, float],
        kind: str,
        start: float = 0.0,
        end: float = 1.0,
        steps: int = 0,
        *,
        importance: str = "l1",
        round_to: int | None = None,
        data: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        from .schedules import sparsity_at

        sparsity_at(kind, 0.0, start, end, 0.0, steps)  # validates kind, start, end
        modules = dict(model.named_modules())
        for name, r in final.items():
            if name not in modules:
                raise TechniqueError(f"no layer named {name!r} to prune")
            if not (0.0 <= r < 1.0):
                raise TechniqueError(f"channel pruning ratio {r} of {name!r} is outside [0, 1)")
        self.model, self.example_inputs = model, example_inputs
        self.kind, self.start, self.end, self.steps = kind, start, end, steps
        self.importance, self.round_to, self.data = importance, round_to, data
        self.skipped = {n for n in output_layers(model, example_inputs) if final.get(n, 0) > 0}
        self.final = {n: r for n, r in final.items() if r > 0 and n not in self.skipped}
        self.initial = {n: _width(modules[n]) for n in self.final}
        self.history: list[tuple[float, dict[str, int]]] = []  # (progress, widths) after each change
        self.changes: dict[str, tuple[int, int]] = {}  # layer -> (first width, current width)
        self._stuck: set[str] = set()

    def widths_at(self, progress: float) -> dict[str, int]:
        """Target output channels of every scheduled layer at ``progress`` in [0, 1]."""
        from .schedules import sparsity_at

        return {
            n: target_width(
                self.initial[n],
                sparsity_at(self.kind, r, self.start, self.end, progress, self.steps),
                self.round_to,
            )
            for n, r in self.final.items()
        }

    def current(self) -> dict[str, int]:
        modules = dict(self.model.named_modules())
        return {n: _width(modules[n]) for n in self.final}

    def step(self, progress: float) -> dict[str, tuple[int, int]]:
        """Prune to the widths of ``progress``; return layer -> (before, after) of what changed."""
        now = self.current()
        wanted = {n: w for n, w in self.widths_at(progress).items() if w < now[n] and n not in self._stuck}
        if not wanted:
            return {}
        was_training = self.model.training
        with bare_weights(self.model):
            changed = prune_to_widths(
                self.model,
                self.example_inputs,
                wanted,
                importance=self.importance,
                round_to=self.round_to,
                data=self.data,
            )
        self.model.train(was_training)
        self._stuck |= {n for n in wanted if n not in changed}  # torch-pruning would not touch it
        for n, (before, after) in changed.items():
            self.changes[n] = (self.changes.get(n, (before, after))[0], after)
        if changed:
            self.history.append((progress, self.current()))
        return changed
