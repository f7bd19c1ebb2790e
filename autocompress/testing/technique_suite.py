"""The technique conformance suite: a technique (a plan) on a reference model, compressed, lowered, checked.

For a plan on a model it checks what holds of every technique: the plan round-trips through JSON, the
compressed model keeps the output shape, a recurrent layer (outside the inventory) keeps its shapes and
is lowered as its plan says, each layer is stored in its precision's container (ONNX artifacts) and
the lowered artifact agrees with the compressed torch model. For the built-in techniques
(:data:`TECHNIQUES`) it also checks, layer by layer, that the technique shows or that the note giving
the reason it was skipped is true of the layer (:data:`TECHNIQUE_CHECKS`).

Run it with :func:`run_technique_suite` (any model class with ``example_inputs()``, a technique name or
a function ``(index, layer name) -> LayerPlan``, any backend), or subclass :class:`TechniqueConformance`
(pytest: every technique in ``techniques`` x every model in ``models``)::

    run_technique_suite(PlainCNN, lambda i, name: LayerPlan(bits=8), OnnxRuntimeBackend(), tmp_path)

This module imports pytest (fixtures); ``autocompress.testing`` itself does not.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto
from torch import nn

from ..backends import OnnxRuntimeBackend
from ..backends.base import Artifact, Backend
from ..backends.onnx_lookup import lookup_block
from ..inventory import build_inventory, matmul_layers
from ..pipeline import Compressed, compress
from ..plan import LayerPlan, Plan, Schedule
from ..tasks import Task
from ..techniques._modules import get_module
from ._check import check
from .backend_suite import lower
from .models import REFERENCE_MODELS
from .substitution_checks import check_separable, check_shared
from .transformer_checks import (
    TRANSFORMER_TECHNIQUES,
    check_heads_pruned,
    check_layers_dropped,
    check_linear_attention,
)

__all__ = [
    "TECHNIQUES",
    "TECHNIQUE_CHECKS",
    "TRANSFORMER_TECHNIQUES",
    "check_heads_pruned",
    "check_layers_dropped",
    "check_linear_attention",
    "TechniqueCase",
    "TechniqueConformance",
    "check_artifact_agrees",
    "check_factorized",
    "check_output_shape_kept",
    "check_plan_round_trips",
    "check_recurrent_layers",
    "check_separable",
    "check_shared",
    "check_stored_bits",
    "check_structured",
    "check_two_four",
    "check_unstructured",
    "compress_and_lower",
    "reference_task",
    "run_technique_suite",
    "technique_plan",
]

LayerPlanFn = Callable[[int, str], LayerPlan]  # (index in the inventory, layer name) -> its plan

# the built-in techniques as one plan per layer
TECHNIQUES: dict[str, LayerPlanFn] = {
    "int8": lambda i, name: LayerPlan(bits=8),
    "int4": lambda i, name: LayerPlan(bits=4),
    "unstructured": lambda i, name: LayerPlan(sparsity=0.5),
    "structured": lambda i, name: LayerPlan(sparsity=0.5, sparsity_kind="structured"),
    "2:4": lambda i, name: LayerPlan(sparsity_kind="2:4"),
    "lowrank": lambda i, name: LayerPlan(rank_ratio=0.5),
    "energy": lambda i, name: LayerPlan(rank_ratio=0.9, rank_mode="energy"),
    "spatial": lambda i, name: LayerPlan(rank_ratio=0.5, rank_mode="spatial"),
    "tucker": lambda i, name: LayerPlan(rank_ratio=0.5, rank_mode="tucker"),
    "mixed": lambda i, name: LayerPlan(bits=(8, 4, 16, 6, 32)[i % 5], rank_ratio=0.75),
    "shared": lambda i, name: LayerPlan(share_bits=4),
    "shared+sparse": lambda i, name: LayerPlan(share_bits=3, sparsity=0.8),
    "separable": lambda i, name: LayerPlan(separable=1),
    "separable+int8": lambda i, name: LayerPlan(separable=1, bits=8),
}


def reference_task(model: str | type[nn.Module], samples: int = 128) -> Task:
    """A task on a reference model (a name in :data:`REFERENCE_MODELS` or a class with
    ``example_inputs(batch)``) whose labels are a seeded random net's own decisions: no data set needed."""
    cls = REFERENCE_MODELS[model] if isinstance(model, str) else model
    name = model if isinstance(model, str) else cls.__name__
    torch.manual_seed(0)
    x = cls.example_inputs(samples)[0]
    with torch.no_grad():
        y = cls().eval()(x).argmax(1)  # labels a random net can learn back
    cut = samples * 3 // 4
    return Task(name=name, model_fn=cls, train=(x[:cut], y[:cut]), test=(x[cut:], y[cut:]), teacher_epochs=0)


def _recurrent(model: nn.Module) -> dict[str, nn.LSTM]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.LSTM)}


def technique_plan(model: nn.Module, task: Task, technique: str | LayerPlanFn) -> Plan:
    """Every inventory layer planned by ``technique`` (a name in :data:`TECHNIQUES` or
    :data:`TRANSFORMER_TECHNIQUES`, or a function), with the fields its kind takes (an embedding table:
    its bits);
    an LSTM (outside the inventory) by hand, from the plan of index 0: dynamic int8 where that is 8
    bits, that plan where it is float, unplanned otherwise."""
    named = {**TECHNIQUES, **TRANSFORMER_TECHNIQUES}
    layer_plan = named[technique] if isinstance(technique, str) else technique
    layers: dict[str, LayerPlan] = {}
    for i, layer in enumerate(build_inventory(model, task.example_inputs(), task.io)):
        layers[layer.name] = layer_plan(i, layer.name).for_kind(layer.kind)[0]  # embeddings: bits only
    for name in _recurrent(model):
        lp = layer_plan(0, name)  # the first layer's plan (mixed: 8 bits, rank 0.75)
        if lp.bits == 8:
            layers[name] = LayerPlan(bits=8, quant_mode="dynamic", rank_ratio=lp.rank_ratio)
        elif lp.bits == 32:
            layers[name] = lp
        # other bit widths on an LSTM are an error (tests/techniques/test_quantize.py): left unplanned
    return Plan(layers=layers, schedule=Schedule("cubic", 0.0, 0.5), epochs=1)


@dataclass
class TechniqueCase:
    """A plan applied to a task's teacher (``out``: :func:`compress`'s result) and lowered (``artifact``)."""

    task: Task
    teacher: nn.Module
    plan: Plan
    out: Compressed
    backend: Backend
    artifact: Artifact

    @property
    def model(self) -> nn.Module:
        return self.out.model


def check_plan_round_trips(plan: Plan) -> None:
    check(Plan.from_json(plan.to_json()) == plan, plan)


def compress_and_lower(
    task: Task, plan: Plan, backend: Backend, workdir: Path, teacher: nn.Module | None = None
) -> TechniqueCase:
    """``compress`` the teacher (default: a new ``task.model_fn()``; channels rounded to 4) by ``plan``
    and lower it by ``backend``."""
    teacher = task.model_fn().eval() if teacher is None else teacher.eval()
    check_plan_round_trips(plan)
    out = compress(task, teacher, plan, reduce_range=backend.reduce_range, round_to=4)
    art = lower(backend, out.model, task.example_inputs(), workdir, out.lowering, task.calibration_inputs(64))
    return TechniqueCase(task, teacher, plan, out, backend, art)


def check_output_shape_kept(case: TechniqueCase) -> None:
    x = case.task.test[0][:8]
    check(case.model(x).shape == case.teacher(x).shape, (case.model(x).shape, case.teacher(x).shape))


def check_unstructured(case: TechniqueCase) -> None:
    """Each unstructured layer has exactly its planned share of zero weights."""
    for name, m in matmul_layers(case.model):
        target = case.plan.layer(name).sparsity
        check(case.out.sparsity[name] >= target - 1e-9, (name, case.out.sparsity[name], target))
        check(int((m.weight == 0).sum()) == round(target * m.weight.numel()), name)


def check_two_four(case: TechniqueCase) -> None:
    """Two of every four consecutive input weights are zero, or the note says (truly) why not."""
    for name, m in matmul_layers(case.model):
        if name in case.out.notes:
            check("not a multiple of 4" in case.out.notes[name], (name, case.out.notes[name]))
            continue
        w = m.weight.detach()
        w = w.movedim(1, -1) if w.dim() > 2 else w
        check(bool(((w.reshape(-1, 4) == 0).sum(1) >= 2).all()), name)
    for name, layer in matmul_layers(case.teacher):
        note = case.out.notes.get(name)
        if note is not None:
            w = layer.weight
            m = re.fullmatch(r"2:4 not applied to .*: (\d+) input channels are not a multiple of 4", note)
            check(m and int(m[1]) == w.shape[1] and w.shape[1] % 4, (name, note))


def check_structured(case: TechniqueCase) -> None:
    """Layers lose output channels as their note says (under 60% of the weights remain), except those
    producing the model output (where everything is such a layer, e.g. an LSTM's head, only noted)."""
    teacher, model, notes = case.teacher, case.model, case.out.notes
    names = [n for n, _ in matmul_layers(teacher)]
    if _recurrent(teacher):  # its only inventory layers produce the output: nothing may be removed
        for name in names:
            check("produces the model output" in notes.get(name, ""), (name, notes.get(name)))
    else:
        before = sum(p.numel() for p in teacher.parameters())
        check(sum(p.numel() for p in model.parameters()) < 0.6 * before)
    classes = teacher(case.task.test[0][:1]).shape[-1]
    for name, layer in matmul_layers(teacher):
        w, now, note = layer.weight, get_module(model, name), notes.get(name)
        width = now.out_channels if isinstance(now, nn.Conv2d) else now.out_features
        if note and "produces the model output" in note:
            check(width == classes, (name, note))  # the logits
            continue
        m = re.fullmatch(r"structured(?: \(.*\))?: output channels (\d+) -> (\d+)", note or "")
        check(m, (name, note))
        check(int(m[1]) == w.shape[0] and int(m[2]) == width < w.shape[0], (name, note, width))


def check_factorized(case: TechniqueCase, mode: str) -> None:
    """Each layer is factorized (fewer weights, the mode's factor count) or the note is true of it."""
    for name, layer in matmul_layers(case.teacher):
        w = layer.weight
        original_macs = w.shape[0] * w[0].numel()  # per output position
        now, note = get_module(case.model, name), case.out.notes.get(name)
        check(note, f"{mode}: {name} was neither factorized nor noted")
        if isinstance(now, nn.Sequential):  # applied: fewer weights, the mode's factor count
            check(len(now) == (3 if mode == "tucker" else 2), (name, now))
            check(sum(f.weight.numel() for f in now) < w.numel(), (name, note))
            check("not" not in note, (name, note))
            continue
        needs_conv = f"not factorized: {mode} needs a Conv2d with a kernel larger than 1x1"
        if note == needs_conv:
            check(not (isinstance(layer, nn.Conv2d) and min(layer.kernel_size) > 1), (name, note))
        elif note.startswith("not factorized: depthwise/grouped conv"):
            check(note == f"not factorized: depthwise/grouped conv (groups={layer.groups})")
            check(layer.groups > 1)
        else:  # the factorization would not pay: its MACs are stated against the layer's own
            m = re.search(r"(?:MACs (\d+)|(\d+) MACs) >= original (\d+)$", note)
            check(m and int(m[1] or m[2]) >= int(m[3]) == original_macs, (name, note, original_macs))


# built-in technique -> its own checks (run after the common ones)
TECHNIQUE_CHECKS: dict[str, Callable[[TechniqueCase], None]] = {
    "unstructured": check_unstructured,
    "2:4": check_two_four,
    "structured": check_structured,
    "lowrank": lambda case: check_factorized(case, "ratio"),
    "energy": lambda case: check_factorized(case, "energy"),
    "spatial": lambda case: check_factorized(case, "spatial"),
    "tucker": lambda case: check_factorized(case, "tucker"),
    "mixed": lambda case: check_factorized(case, "ratio"),
    "heads": check_heads_pruned,
    "layerdrop": check_layers_dropped,
    "heads+layerdrop+int8": lambda case: (check_layers_dropped(case), check_heads_pruned(case)),
    "shared": lambda case: check_shared(case, 4),
    "shared+sparse": lambda case: check_shared(case, 3, pruned=True),
    "separable": check_separable,
    "separable+int8": check_separable,
    "linear_attention": check_linear_attention,
    "linear_attention+heads": lambda case: (check_linear_attention(case), check_heads_pruned(case)),
}


def check_recurrent_layers(case: TechniqueCase) -> None:
    """An LSTM stays outside the inventory with its shapes; only dynamic int8 applies to it (ONNX:
    DynamicQuantizeLSTM), anything else planned on it is noted as not applied."""
    inventory = {i.name for i in build_inventory(case.teacher, case.task.example_inputs(), case.task.io)}
    is_onnx = case.artifact.path.suffix == ".onnx"
    ops = [n.op_type for n in onnx.load(str(case.artifact.path)).graph.node] if is_onnx else []
    for name, lstm in _recurrent(case.teacher).items():
        now = get_module(case.model, name)
        check(name not in inventory and isinstance(now, nn.LSTM), name)
        check([p.shape for p in now.parameters()] == [p.shape for p in lstm.parameters()], name)
        lp = case.plan.layers.get(name)
        if lp is not None and lp.bits == 8:
            check(case.out.layer_bits[name] == 8, case.out.layer_bits)
            check(not is_onnx or ("DynamicQuantizeLSTM" in ops and "LSTM" not in ops), ops)
        else:
            check(name not in case.out.layer_bits and (not is_onnx or "LSTM" in ops), ops)
        if lp is not None and (lp.rank_ratio < 1.0 or lp.sparsity > 0 or lp.sparsity_kind == "2:4"):
            check(
                re.fullmatch(
                    r"(low rank|(unstructured|structured|2:4) sparsity) not applied: LSTM layers take dynamic "
                    r"int8 only",
                    case.out.notes.get(name, ""),
                ),
                case.out.notes.get(name),
            )


def check_stored_bits(case: TechniqueCase) -> None:
    """Each (factor of a) layer's weight is stored in its precision's container in the ONNX file
    (matched by element count: a Linear on tokens is exported as a MatMul with a generated name)."""
    container = {4: TensorProto.INT4, 6: TensorProto.INT8, 8: TensorProto.INT8, 16: TensorProto.FLOAT16}
    # an embedding table of 2-4 bits that GatherBlockQuantized reads: uint8, two values a byte
    graph = onnx.load(str(case.artifact.path)).graph
    stored = Counter((i.data_type, int(np.prod(i.dims))) for i in graph.initializer)
    wanted = Counter()
    present = {n for n, _ in case.model.named_modules()}
    for name, lp in case.plan.layers.items():
        if name not in present:  # its block was dropped (layer dropping): it holds no weights
            continue
        now = get_module(case.model, name)
        if isinstance(now, nn.LSTM):  # dynamic int8: DynamicQuantizeLSTM (check_recurrent_layers)
            continue
        if isinstance(now, nn.Embedding) and lp.bits <= 4 and lookup_block(now.embedding_dim):
            wanted[(TensorProto.UINT8, now.weight.numel() // 2)] += 1
            continue
        for m in now if isinstance(now, nn.Sequential) else [now]:
            wanted[(container.get(lp.bits, TensorProto.FLOAT), m.weight.numel())] += 1
    check(not wanted - stored, (wanted - stored, stored))


def check_artifact_agrees(case: TechniqueCase, atol: float | None = None) -> None:
    """The artifact's outputs on the task's test inputs are the compressed model's. Statically quantized
    activations (5-8 bit layers): 90% of decisions agree, logits within 5% of their largest magnitude
    (measured on the reference models: every decision, 2.5%); otherwise ``atol`` (default 1e-2 with
    narrower weights, 1e-3 for float ones), rtol 1e-3."""
    x = case.task.test[0]
    got = np.asarray(case.backend.runner(case.artifact)((x.numpy(),)))
    ref = case.model(x).detach().numpy()
    lps = case.plan.layers.values()
    if any(5 <= lp.bits <= 8 and lp.quant_mode == "static" for lp in lps):
        check(np.mean(got.argmax(1) == ref.argmax(1)) >= 0.9, np.mean(got.argmax(1) == ref.argmax(1)))
        check(
            np.abs(got - ref).max() <= 0.05 * np.abs(ref).max(),
            (
                np.abs(got - ref).max(),
                np.abs(ref).max(),
            ),
        )
        return
    if atol is None:
        atol = 1e-2 if any(lp.bits < 32 for lp in lps) else 1e-3
    np.testing.assert_allclose(got, ref, atol=atol, rtol=1e-3)


def run_technique_suite(
    model: str | type[nn.Module],
    technique: str | LayerPlanFn | Plan,
    backend: Backend,
    workdir: Path,
    extra_checks: tuple[Callable[[TechniqueCase], None], ...] = (),
) -> TechniqueCase:
    """Plan ``technique`` on ``model``'s every layer (or take a whole :class:`Plan`), compress, lower by
    ``backend`` into ``workdir`` and run the checks: the common ones, the built-in technique's own
    (:data:`TECHNIQUE_CHECKS`) and ``extra_checks``. Raises ``AssertionError``; returns the case."""
    task = reference_task(model)
    teacher = task.model_fn().eval()  # drawn right after the task's seeded data (the measured tolerances)
    plan = technique if isinstance(technique, Plan) else technique_plan(teacher, task, technique)
    case = compress_and_lower(task, plan, backend, Path(workdir), teacher)
    check_output_shape_kept(case)
    own = TECHNIQUE_CHECKS.get(technique) if isinstance(technique, str) else None
    for extra in (*((own,) if own else ()), *extra_checks):
        extra(case)
    check_recurrent_layers(case)
    if case.artifact.path.suffix == ".onnx" and any(lp.bits < 32 for lp in plan.layers.values()):
        check_stored_bits(case)
    check_artifact_agrees(case)
    return case


class TechniqueConformance:
    """The suite as pytest tests: each of ``techniques`` on each of ``models`` (names in
    :data:`REFERENCE_MODELS` or model classes), lowered by :meth:`make_backend` (ONNX Runtime on the CPU
    by default). A third-party technique sets ``techniques = {"mine": layer_plan_fn}``."""

    models: tuple[str | type[nn.Module], ...] = ("plain_cnn", "resnet", "mobilenet", "transformer", "lstm")
    techniques: tuple[str, ...] | dict[str, LayerPlanFn] = tuple(TECHNIQUES)

    def make_backend(self) -> Backend:
        return OnnxRuntimeBackend()

    def pytest_generate_tests(self, metafunc):
        if "technique" in metafunc.fixturenames and "model" in metafunc.fixturenames:
            ids = [m if isinstance(m, str) else m.__name__ for m in self.models]
            metafunc.parametrize("model", self.models, ids=ids)
            metafunc.parametrize("technique", list(self.techniques))

    @pytest.fixture(scope="class")
    def technique_backend(self):
        be = self.make_backend()
        yield be
        be.close()

    def test_technique_on_reference_model(self, model, technique, technique_backend, tmp_path):
        plan_fn = self.techniques[technique] if isinstance(self.techniques, dict) else technique
        run_technique_suite(model, plan_fn, technique_backend, tmp_path)
