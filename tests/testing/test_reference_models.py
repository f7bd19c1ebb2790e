"""The technique conformance suite (:mod:`autocompress.testing.technique_suite`): every built-in
technique on every reference model where it applies, exported through the onnxruntime backend; and
the techniques' own unit checks on the reference models."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from autocompress.backends import OnnxRuntimeBackend
from autocompress.errors import TechniqueError
from autocompress.inventory import compressible_layers
from autocompress.pipeline import compress
from autocompress.plan import LayerPlan, Plan
from autocompress.techniques import nm_mask, prune_channels, sparsity_at
from autocompress.testing import REFERENCE_MODELS
from autocompress.testing.backend_suite import lower
from autocompress.testing.technique_suite import TechniqueConformance, reference_task


class TestReferenceModels(TechniqueConformance):
    """Each of the 10 built-in techniques on plain_cnn, resnet, mobilenet, transformer and lstm."""


class TestTransformerTechniques(TechniqueConformance):
    """Head pruning, layer dropping and dynamic int8 together (every block planned away: one stays), linear
    attention alone and with head pruning, on the models with attention modules (``nn.TransformerEncoder``, a transformers BERT); ``heads`` and
    ``layerdrop`` alone are in :data:`~autocompress.testing.transformer_checks.TRANSFORMER_TECHNIQUES` too."""

    models = ("torch_transformer", "bert")
    techniques = ("heads+layerdrop+int8", "linear_attention", "linear_attention+heads")


class TestEmbeddingTables(TechniqueConformance):
    """The quantization plans on a transformers BERT, whose word / position / token-type tables take the
    plan's bits (weight-only; the rest of a plan does not apply to them): stored in their containers
    (int4 tables: uint8, two values a byte, for GatherBlockQuantized), the artifact agreeing with torch."""

    models = ("bert",)
    techniques = ("int4", "mixed")


@pytest.fixture(scope="module")
def backend():
    be = OnnxRuntimeBackend()
    yield be
    be.close()


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
    task = reference_task("resnet")
    task.model_fn = lambda: REFERENCE_MODELS["resnet"](64)  # ~0.7M weights: graph overhead stays small
    teacher = task.model_fn().eval()
    names = [n for n, _ in compressible_layers(teacher)]
    bits = {n: (2, 4, 6, 8, 16, 32)[i % 6] for i, n in enumerate(names)}
    plan = Plan(layers={n: LayerPlan(bits=b) for n, b in bits.items()}, epochs=0)
    out = compress(task, teacher, plan, reduce_range=backend.reduce_range)
    art = lower(
        backend, out.model, task.example_inputs(), tmp_path, out.lowering, task.calibration_inputs(64)
    )
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
