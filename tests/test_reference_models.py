"""The shared technique suite: every technique on every reference model where it applies, exported
through the onnxruntime backend."""

from __future__ import annotations

import copy
import re

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from autocompress.backends import OnnxRuntimeBackend
from autocompress.errors import TechniqueError
from autocompress.inventory import build_inventory, compressible_layers
from autocompress.pipeline import compress
from autocompress.plan import LayerPlan, Plan, Schedule
from autocompress.tasks import Task
from autocompress.techniques import nm_mask, prune_channels, sparsity_at
from autocompress.techniques._modules import get_module
from autocompress.testing import REFERENCE_MODELS


def _task(name: str) -> Task:
    cls = REFERENCE_MODELS[name]
    torch.manual_seed(0)
    x = cls.example_inputs(128)[0]
    with torch.no_grad():
        y = cls().eval()(x).argmax(1)  # labels a random net can learn back: tests need no data set
    return Task(name=name, model_fn=cls, train=(x[:96], y[:96]), test=(x[96:], y[96:]), teacher_epochs=0)


def _plan(model: nn.Module, task: Task, technique: str) -> Plan:
    inv = build_inventory(model, task.example_inputs())
    layers = {}
    for i in inv:
        lp = {
            "int8": LayerPlan(bits=8),
            "int4": LayerPlan(bits=4),
            "unstructured": LayerPlan(sparsity=0.5),
            "structured": LayerPlan(sparsity=0.5, sparsity_kind="structured"),
            "2:4": LayerPlan(sparsity_kind="2:4"),
            "lowrank": LayerPlan(rank_ratio=0.5),
            "energy": LayerPlan(rank_ratio=0.9, rank_mode="energy"),
            "spatial": LayerPlan(rank_ratio=0.5, rank_mode="spatial"),
            "tucker": LayerPlan(rank_ratio=0.5, rank_mode="tucker"),
            "mixed": LayerPlan(bits=(8, 4, 16, 6, 32)[len(layers) % 5], rank_ratio=0.75),
        }[technique]
        layers[i.name] = lp
    if isinstance(getattr(model, "lstm", None), nn.LSTM):  # outside the inventory; planned by hand here
        if technique == "int8":
            layers["lstm"] = LayerPlan(bits=8, quant_mode="dynamic")
        elif technique == "mixed":
            layers["lstm"] = LayerPlan(bits=8, quant_mode="dynamic", rank_ratio=0.75)
        elif technique != "int4":  # 4 bits on an LSTM is an error (test_quant_depth.py)
            layers["lstm"] = lp
    return Plan(layers=layers, schedule=Schedule("cubic", 0.0, 0.5), epochs=1)


CONV_MODELS = ["plain_cnn", "resnet", "mobilenet"]
ALL = [*CONV_MODELS, "transformer", "lstm"]
TECHNIQUES = [
    "int8",
    "int4",
    "unstructured",
    "structured",
    "2:4",
    "lowrank",
    "energy",
    "spatial",
    "tucker",
    "mixed",
]


@pytest.fixture(scope="module")
def backend():
    be = OnnxRuntimeBackend()
    yield be
    be.close()


@pytest.mark.parametrize("technique", TECHNIQUES)
@pytest.mark.parametrize("model_name", ALL)
def test_technique_on_reference_model_exports_through_ort(model_name, technique, backend, tmp_path):
    task = _task(model_name)
    teacher = task.model_fn().eval()
    plan = _plan(teacher, task, technique)
    assert Plan.from_json(plan.to_json()) == plan
    out = compress(task, teacher, plan, reduce_range=backend.reduce_range, round_to=4)
    model = out.model
    x = task.test[0][:8]
    assert model(x).shape == teacher(x).shape  # output shape kept
    if technique == "unstructured":
        for name, m in compressible_layers(model):
            assert out.sparsity[name] >= 0.5 - 1e-9
            assert int((m.weight == 0).sum()) == round(0.5 * m.weight.numel())
    if technique == "2:4":
        for name, m in compressible_layers(model):
            if name in out.notes:
                assert "not a multiple of 4" in out.notes[name]
                continue
            w = m.weight.detach()
            w = w.movedim(1, -1) if w.dim() > 2 else w
            assert bool(((w.reshape(-1, 4) == 0).sum(1) >= 2).all())
    if technique == "structured":
        before = sum(p.numel() for p in teacher.parameters())
        if model_name == "lstm":  # its only Linear produces the output: nothing may be removed
            assert "produces the model output" in out.notes["head"]
        else:
            assert sum(p.numel() for p in model.parameters()) < 0.6 * before
    _check_each_layer(technique, plan, teacher, out)
    art = backend.lower(model, task.example_inputs(), out.lowering, tmp_path, task.calibration_inputs(64))
    if model_name == "lstm":  # the recurrent layer: not in the inventory, only dynamic int8 applies to it
        assert "lstm" not in {i.name for i in build_inventory(teacher, task.example_inputs())}
        assert isinstance(model.lstm, nn.LSTM)
        assert [p.shape for p in model.lstm.parameters()] == [p.shape for p in teacher.lstm.parameters()]
        ops = [n.op_type for n in onnx.load(str(art.path)).graph.node]
        lp = plan.layers.get("lstm")
        if lp is not None and lp.bits == 8:
            assert out.precisions["lstm"] == 8 and "DynamicQuantizeLSTM" in ops and "LSTM" not in ops
        else:
            assert "lstm" not in out.precisions and "LSTM" in ops
        if lp is not None and (lp.rank_ratio < 1.0 or lp.sparsity > 0 or lp.sparsity_kind == "2:4"):
            assert re.fullmatch(
                r"(low rank|(unstructured|structured|2:4) sparsity) not applied: LSTM layers take dynamic "
                r"int8 only",
                out.notes["lstm"],
            ), out.notes.get("lstm")
    if technique in ("int8", "int4", "mixed"):
        _check_stored_precisions(art, plan, model)
    sess = backend.session(art.path)
    x = task.test[0]  # 32 samples
    got = sess.run(None, {"input": x.numpy()})[0]
    ref = model(x).detach().numpy()
    if technique in ("int8", "mixed"):
        # activations are quantized too; measured on all 50 cases: every decision agrees, logits within
        # 2.5% of their largest magnitude
        assert np.mean(got.argmax(1) == ref.argmax(1)) >= 0.9
        assert np.abs(got - ref).max() <= 0.05 * np.abs(ref).max()
    else:
        np.testing.assert_allclose(got, ref, atol=1e-3 if technique != "int4" else 1e-2, rtol=1e-3)


RANK_MODES = {
    "lowrank": "ratio",
    "energy": "energy",
    "spatial": "spatial",
    "tucker": "tucker",
    "mixed": "ratio",
}


def _check_each_layer(technique: str, plan: Plan, teacher: nn.Module, out) -> None:
    """Every planned layer either shows the technique or carries the reason it was skipped, and the
    reason is true of the layer."""
    for name, layer in compressible_layers(teacher):
        w = layer.weight
        original_macs = w.shape[0] * w[0].numel()  # per output position
        now = get_module(out.model, name)
        note = out.notes.get(name)
        if technique == "structured":
            width = now.out_channels if isinstance(now, nn.Conv2d) else now.out_features
            if note and "produces the model output" in note:
                assert width == 10, (name, note)  # the logits
                continue
            m = re.fullmatch(r"structured(?: \(.*\))?: output channels (\d+) -> (\d+)", note or "")
            assert m, (name, note)
            assert int(m[1]) == w.shape[0] and int(m[2]) == width < w.shape[0], (name, note, width)
        elif technique == "2:4" and note is not None:
            m = re.fullmatch(r"2:4 not applied to .*: (\d+) input channels are not a multiple of 4", note)
            assert m and int(m[1]) == w.shape[1] and w.shape[1] % 4, (name, note)
        elif technique in RANK_MODES:
            assert note, f"{technique}: {name} was neither factorized nor noted"
            if isinstance(now, nn.Sequential):  # applied: fewer weights, the mode's factor count
                assert len(now) == (3 if technique == "tucker" else 2), (name, now)
                assert sum(f.weight.numel() for f in now) < w.numel(), (name, note)
                assert "not" not in note, (name, note)
                continue
            needs_conv = (
                f"not factorized: {RANK_MODES[technique]} needs a Conv2d with a kernel larger than 1x1"
            )
            if note == needs_conv:
                assert not (isinstance(layer, nn.Conv2d) and min(layer.kernel_size) > 1), (name, note)
            elif note.startswith("not factorized: depthwise/grouped conv"):
                assert note == f"not factorized: depthwise/grouped conv (groups={layer.groups})"
                assert layer.groups > 1
            else:  # the factorization would not pay: its MACs are stated against the layer's own
                m = re.search(r"(?:MACs (\d+)|(\d+) MACs) >= original (\d+)$", note)
                assert m and int(m[1] or m[2]) >= int(m[3]) == original_macs, (name, note, original_macs)


def _check_stored_precisions(art, plan: Plan, model: nn.Module) -> None:
    """Each (factor of a) layer's weight is stored in its precision's container in the ONNX file
    (matched by element count: a Linear on tokens is exported as a MatMul with a generated name)."""
    from collections import Counter

    from onnx import TensorProto

    container = {4: TensorProto.INT4, 6: TensorProto.INT8, 8: TensorProto.INT8, 16: TensorProto.FLOAT16}
    stored = Counter((i.data_type, int(np.prod(i.dims))) for i in onnx.load(str(art.path)).graph.initializer)
    wanted = Counter()
    for name, lp in plan.layers.items():
        now = get_module(model, name)
        if isinstance(now, nn.LSTM):  # dynamic int8: DynamicQuantizeLSTM, checked by the caller
            continue
        for m in now if isinstance(now, nn.Sequential) else [now]:
            wanted[(container.get(lp.bits, TensorProto.FLOAT), m.weight.numel())] += 1
    assert not wanted - stored, (wanted - stored, stored)


def test_structured_pruning_keeps_residual_and_depthwise_consistent():
    for name in ("resnet", "mobilenet"):
        torch.manual_seed(0)
        cls = REFERENCE_MODELS[name]
        m = cls().eval()
        x = cls.example_inputs()
        changes = prune_channels(m, x, {n: 0.5 for n, _ in compressible_layers(m)}, round_to=8)
        assert changes and m(*x).shape == (2, 10)
        for n, (before, after) in changes.items():
            assert after % 8 == 0 and after < before, (n, before, after)
        for mod in m.modules():  # depthwise convs keep groups == channels
            if isinstance(mod, nn.Conv2d) and mod.groups > 1:
                assert mod.groups == mod.in_channels == mod.out_channels


def test_structured_pruning_errors():
    m = REFERENCE_MODELS["plain_cnn"]().eval()
    x = REFERENCE_MODELS["plain_cnn"].example_inputs()
    with pytest.raises(TechniqueError, match="unknown importance 'l3'"):
        prune_channels(m, x, {"features.0": 0.5}, importance="l3")
    with pytest.raises(TechniqueError, match=r"ratio 1.0 of 'features.0' is outside \[0, 1\)"):
        prune_channels(m, x, {"features.0": 1.0})
    with pytest.raises(TechniqueError, match="taylor importance needs"):
        prune_channels(m, x, {"features.0": 0.5}, importance="taylor")
    t = REFERENCE_MODELS["transformer"]().eval()  # channels of a head-split projection: a clear error
    with pytest.raises(
        TechniqueError, match=r"structured pruning of layers.0.attn.q broke the model's forward"
    ):
        prune_channels(t, REFERENCE_MODELS["transformer"].example_inputs(), {"layers.0.attn.q": 0.5})


@pytest.mark.parametrize("importance", ["l1", "l2", "taylor"])
def test_structured_importances(importance):
    """Each importance keeps the channels it should: the largest filters, and (Taylor only, which looks
    at gradients) not the large filters whose ReLU never fires."""
    torch.manual_seed(0)
    m = REFERENCE_MODELS["plain_cnn"]().eval()
    x = REFERENCE_MODELS["plain_cnn"].example_inputs(16)
    y = torch.randint(0, 10, (16,))
    perm = torch.randperm(16)
    large, off = sorted(perm[:8].tolist()), sorted(perm[:4].tolist())  # scattered: no fixed order picks them
    with torch.no_grad():
        m.features[0].weight[perm[8:]] *= 0.05  # 8 small filters, 8 large ones
        m.features[0].weight[perm[:8]] *= 2.0

    def kept(model: nn.Module, ref: nn.Module) -> list[int]:  # which original filters survived
        rows = model.features[0].weight
        return [i for i, w in enumerate(ref.features[0].weight) if any(torch.equal(w, r) for r in rows)]

    pruned = copy.deepcopy(m)
    changes = prune_channels(pruned, x, {"features.0": 0.5}, importance=importance, data=(x[0], y))
    assert changes["features.0"] == (16, 8)
    assert kept(pruned, m) == large
    silent = copy.deepcopy(m)
    with torch.no_grad():  # 4 of the large filters: a BN bias that keeps their ReLU off on every input
        silent.features[1].bias[off] = -100.0
    pruned = copy.deepcopy(silent)
    prune_channels(pruned, x, {"features.0": 0.5}, importance=importance, data=(x[0], y))
    if importance == "taylor":  # zero gradient through a dead ReLU: zero first-order importance
        assert set(kept(pruned, silent)) & set(large) == set(large) - set(off)
        assert not set(kept(pruned, silent)) & set(off)
    else:  # magnitudes see the weights only
        assert kept(pruned, silent) == large


def test_nm_mask_pattern_is_exact():
    torch.manual_seed(0)
    w = torch.randn(6, 8, 3, 3)
    mask = nm_mask(w, 2, 4)
    groups = mask.movedim(1, -1).reshape(-1, 4)
    assert bool((groups.sum(1) == 2).all())
    kept = (w.abs() * mask).movedim(1, -1).reshape(-1, 4)
    dropped = (w.abs() * (1 - mask)).movedim(1, -1).reshape(-1, 4)
    assert bool((kept.max(1).values >= dropped.max(1).values).all())
    with pytest.raises(TechniqueError, match="input channels divisible by 4, got 3"):
        nm_mask(torch.randn(4, 3), 2, 4)


@pytest.mark.parametrize(
    ("kind", "progress", "steps", "expected"),
    [
        ("exponential", 0.5, 0, 0.8 * (1 - np.exp(-2.5)) / (1 - np.exp(-5))),
        ("exponential", 1.0, 0, 0.8),
        ("linear", 0.59, 4, 0.8 * 0.5),  # q = 0.59 -> staircase of 4 -> 0.5
        ("linear", 0.61, 4, 0.8 * 0.5),
        ("linear", 0.76, 4, 0.8 * 0.75),
        ("cubic", 0.35, 2, 0.0),
        ("cubic", 0.5, 2, 0.8 * (1 - 0.5**3)),
    ],
)
def test_schedule_kinds_and_steps(kind, progress, steps, expected):
    assert sparsity_at(kind, 0.8, 0.0, 1.0, progress, steps) == pytest.approx(expected, abs=1e-12)


def test_mixed_precision_artifact_carries_each_layers_precision_and_expected_size(backend, tmp_path):
    import onnx
    from onnx import TensorProto

    torch.manual_seed(0)
    task = _task("resnet")
    task.model_fn = lambda: REFERENCE_MODELS["resnet"](64)  # ~0.7M weights: graph overhead stays small
    teacher = task.model_fn().eval()
    names = [n for n, _ in compressible_layers(teacher)]
    bits = {n: (2, 4, 6, 8, 16, 32)[i % 6] for i, n in enumerate(names)}
    plan = Plan(layers={n: LayerPlan(bits=b) for n, b in bits.items()}, epochs=0)
    out = compress(task, teacher, plan, reduce_range=backend.reduce_range)
    art = backend.lower(out.model, task.example_inputs(), out.lowering, tmp_path, task.calibration_inputs(64))
    inits = {i.name: i.data_type for i in onnx.load(str(art.path)).graph.initializer}
    for n, b in bits.items():
        expected = {
            2: (f"{n}.weight_int2", TensorProto.INT4),  # a 2-bit grid in the INT4 container
            4: (f"{n}.weight_int4", TensorProto.INT4),
            6: (f"{n}.weight_quantized", TensorProto.INT8),  # a 6-bit grid on int8 kernels
            8: (f"{n}.weight_quantized", TensorProto.INT8),
            16: (f"{n}.weight_fp16", TensorProto.FLOAT16),
            32: (f"{n}.weight", TensorProto.FLOAT),
        }[b]
        assert inits.get(expected[0]) == expected[1], (n, b)
    # the plan's expected size: every weight in its precision's container (INT4 for 2-4 bits, int8 for
    # 5-8, float16, float32) plus float biases; scales and graph add the rest (under 5%)
    assert art.size_bytes == pytest.approx(art.meta["weights_stored_bytes"], rel=0.05)
    assert art.packed_size_bytes < art.meta["weights_stored_bytes"]  # 2- and 6-bit grids in wider containers
