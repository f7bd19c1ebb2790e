"""The state one :func:`autocompress.pipeline.compress` call hands from technique step to technique step."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..inventory import compressible_layers
from ..lowering import LayerLowering
from ._modules import get_module


@dataclass
class Build:
    """What the registered steps read and write while the compressed model is built.

    Steps run in their registered order (see :class:`autocompress.registry.TechniqueSpec`). A step may
    append hooks: ``progress`` hooks run at each point of the fine-tuning schedule (``progress`` in
    [0, 1]) and at the end (1.0); they return True when layers got physically smaller (new parameters:
    the optimizer starts afresh and the ``changed`` hooks run). ``trained`` hooks run right after the
    fine-tuning loop; ``finish`` hooks after the schedule's last point, before the parametrizations are
    baked into the weights. ``loss_terms`` are added to the fine-tuning loss at every step and
    ``parameters`` give the optimizer extra trainable parameters. ``cleanup`` hooks run when ``compress``
    returns or raises (e.g. forward hooks a step put on the shared teacher come off).

    Attributes:
        task, teacher, plan: the inputs of ``compress``.
        student: the model being compressed.
        total: fine-tuning optimizer steps (0: post-training compression).
        reduce_range, round_to: the backend's 8-bit grid and preferred channel multiple.
        notes: planned layer -> why a planned step was skipped or what it did.
        origin: effective module name -> planned layer (a factorized layer gives ``name.0``, ``name.1``).
        layer_bits: effective module name -> bits.
        lowering: effective module name -> how the backend lowers it.
        calibration: activation calibration method of the 8-bit static layers.
    """

    task: Any
    teacher: nn.Module
    plan: Any
    student: nn.Module
    total: int = 0
    reduce_range: bool = False
    round_to: int | None = None
    notes: dict[str, str] = field(default_factory=dict)
    origin: dict[str, str] | None = None
    layer_bits: dict[str, int] = field(default_factory=dict)
    lowering: dict[str, LayerLowering] = field(default_factory=dict)
    calibration: str = "minmax"
    channel_steps: list = field(default_factory=list)
    progress: list[Callable[[float], bool]] = field(default_factory=list)
    changed: list[Callable[[], None]] = field(default_factory=list)
    finish: list[Callable[[], None]] = field(default_factory=list)
    trained: list[Callable[[], None]] = field(default_factory=list)
    loss_terms: list[Callable[[], Any]] = field(default_factory=list)
    parameters: list[Callable[[], list]] = field(default_factory=list)
    cleanup: list[Callable[[], None]] = field(default_factory=list)
    _modules: dict[str, nn.Module] | None = None

    def note(self, layer: str, text: str) -> None:
        """Add ``text`` to the layer's note (after what an earlier step wrote there, ``; `` between)."""
        self.notes[layer] = f"{self.notes[layer]}; {text}" if self.notes.get(layer) else text

    @property
    def iterative(self) -> bool:
        """Structured pruning follows the sparsity schedule (else it happens once, before low rank)."""
        return self.plan.schedule.kind != "one_shot" and self.total > 0

    def layers(self) -> dict[str, str]:
        """Effective module name -> planned layer (the compressible layers until low rank ran)."""
        if self.origin is None:
            return {name: name for name, _ in compressible_layers(self.student)}
        return self.origin

    @property
    def modules(self) -> dict[str, nn.Module]:
        """Effective module name -> module (fixed once asked: call after low rank)."""
        if self._modules is None:
            self.origin = self.layers()
            self._modules = {name: get_module(self.student, name) for name in self.origin}
        return self._modules

    def advance(self, progress: float, training: bool = True) -> bool:
        """Run the progress hooks; True when layers got smaller (then, while training, ``changed``)."""
        changed = False
        for hook in list(self.progress):
            changed = bool(hook(progress)) or changed
        if changed and training:
            for hook in self.changed:
                hook()
        return changed
