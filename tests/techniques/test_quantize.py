"""Quantization in depth: per-tensor / asymmetric grids, percentile calibration, dynamic int8 layers,
post-training quantization and learned step sizes (LSQ), each checked on the real ORT artifact."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper
from torch import nn

from autocompress.backends import OnnxRuntimeBackend
from autocompress.errors import BackendError, ConfigError, TechniqueError
from autocompress.inventory import build_inventory, compressible_layers
from autocompress.lowering import LayerLowering, LoweringSpec
from autocompress.pipeline import compress
from autocompress.plan import LayerPlan, Plan
from autocompress.space import SearchSpace
from autocompress.tasks import Task
from autocompress.techniques import (
    LSQFakeQuant,
    add_fake_quant,
    fold_batchnorm,
    int_range,
    record_weight_quant,
    weight_qparams,
)
from autocompress.testing import REFERENCE_MODELS

ROOT = Path(__file__).resolve().parents[2]
GRIDS = [(s, g) for s in ("symmetric", "asymmetric") for g in ("channel", "tensor")]


@pytest.fixture(scope="module")
def backend():
    be = OnnxRuntimeBackend()
    yield be
    be.close()


def _task(name: str, n: int = 128) -> Task:
    cls = REFERENCE_MODELS[name]
    torch.manual_seed(0)
    x = cls.example_inputs(n)[0]
    with torch.no_grad():
        y = cls().eval()(x).argmax(1)  # labels a random net can learn back: no data set needed
    return Task(name=name, model_fn=cls, train=(x[:96], y[:96]), test=(x[96:], y[96:]), teacher_epochs=0)


def _run(backend, art, x: torch.Tensor) -> np.ndarray:
    return backend.session(art.path).run(None, {"input": x.numpy()})[0]


def _graph(art) -> onnx.GraphProto:
    return onnx.load(str(art.path)).graph


# -- grids ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("scheme", "granularity"), GRIDS)
@pytest.mark.parametrize("bits", [4, 8])
def test_grid_is_exact_for_zero_and_within_half_a_step(bits, scheme, granularity):
    torch.manual_seed(0)
    w = torch.randn(8, 6, 3) + 0.7  # skewed: an asymmetric grid must use its zero point
    w[:, 0, 0] = 0.0  # pruned weights must stay exactly zero on every grid
    layer = nn.Conv1d(6, 8, 3)
    layer.weight.data = w.clone()
    add_fake_quant(layer, bits, scheme=scheme, granularity=granularity)
    rec = record_weight_quant(layer)
    qmin, qmax = int_range(bits, scheme)
    assert rec.q.min() >= qmin and rec.q.max() <= qmax
    assert rec.scale.shape == ((8,) if granularity == "channel" else ())
    np.testing.assert_allclose(rec.dequantize(), layer.weight.detach().numpy(), rtol=0, atol=1e-6)
    assert not layer.weight.detach()[:, 0, 0].any()
    scale, zero = weight_qparams(w, bits, scheme, granularity)
    assert float((layer.weight.detach() - w).abs().max()) <= float(scale.max()) / 2 + 1e-6
    if scheme == "symmetric":
        assert not zero.any()
    else:
        assert zero.abs().sum() > 0  # the skew moves the zero point
        assert rec.q.min() == qmin or rec.q.max() == qmax  # the range is used to an end
    # an asymmetric grid spends its levels on the actual range: lower error on skewed weights
    if scheme == "asymmetric" and granularity == "tensor":
        sym = nn.Conv1d(6, 8, 3)
        sym.weight.data = w.clone()
        add_fake_quant(sym, bits, granularity="tensor")
        assert (sym.weight - w).pow(2).mean() > (layer.weight - w).pow(2).mean()


def test_reduce_range_grids():
    assert int_range(8, "symmetric", True) == (-63, 63)
    assert int_range(8, "asymmetric", True) == (-64, 63)
    assert int_range(4, "asymmetric", True) == (-8, 7)
    with pytest.raises(TechniqueError, match="quant_scheme 'affine' is not one of"):
        int_range(8, "affine")


# -- plan -----------------------------------------------------------------------------------------
def test_plan_fields_round_trip_and_defaults():
    plan = Plan(
        layers={
            "a": LayerPlan(bits=8, quant_scheme="asymmetric", quant_granularity="tensor"),
            "b": LayerPlan(bits=8, quant_mode="dynamic"),
        },
        calibration="percentile",
        lsq=True,
    )
    assert Plan.from_json(plan.to_json()) == plan
    assert LayerPlan() == LayerPlan(
        quant_granularity="channel", quant_scheme="symmetric", quant_mode="static"
    )
    assert Plan().calibration == "minmax" and Plan().lsq is False
    old = {"layers": {"a": {"bits": 8, "sparsity": 0.0, "rank_ratio": 1.0}}}  # a plan stored before
    assert Plan.from_dict(old).layer("a").quant_scheme == "symmetric"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"quant_scheme": "affine"}, r"layers\.x\.quant_scheme.*'affine' is not one of"),
        ({"quant_granularity": "group"}, r"quant_granularity 'group' is not one of"),
        ({"quant_mode": "weight_only"}, r"quant_mode 'weight_only' is not one of"),
        ({"bits": 4, "quant_mode": "dynamic"}, r"quant_mode 'dynamic' needs bits 8"),
    ],
)
def test_layer_plan_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        Plan(layers={"x": LayerPlan(**kwargs)})


def test_plan_level_errors():
    with pytest.raises(ConfigError, match="calibration 'entropy' is not one of"):
        Plan(calibration="entropy")
    with pytest.raises(ConfigError, match="lsq 'yes' must be true or false"):
        Plan(lsq="yes")


# -- the artifact holds what the torch model was fine-tuned with ----------------------------------
@pytest.mark.parametrize(("scheme", "granularity"), GRIDS)
def test_artifact_integers_scales_and_zero_points_match_torch(
    scheme, granularity, tmp_path, backend, digits_task, digits_teacher
):
    """features.3 at 4 bits (weight-only DQ: the artifact computes exactly the torch model's layer) and
    features.6 + classifier at 8 bits (QDQ on int8 kernels), all on the same grid kind."""
    grid = {"quant_scheme": scheme, "quant_granularity": granularity}
    plan = Plan(
        layers={
            "features.3": LayerPlan(bits=4, **grid),
            "features.6": LayerPlan(bits=8, **grid),
            "classifier": LayerPlan(bits=8, **grid),
        },
        epochs=0,
    )
    out = compress(digits_task, digits_teacher, plan, reduce_range=backend.reduce_range)
    art = backend.lower(
        out.model, digits_task.example_inputs(), out.lowering, tmp_path, digits_task.calibration_inputs()
    )
    g = _graph(art)
    inits = {i.name: i for i in g.initializer}
    dq = {n.input[0]: n for n in g.node if n.op_type == "DequantizeLinear"}
    for layer, stored in (
        ("features.3", "features.3.weight_int4"),
        ("features.6", "features.6.weight_quantized"),
        ("classifier", "classifier.weight_quantized"),
    ):
        rec = out.lowering.layer(layer).weight
        node = dq[stored]
        q = numpy_helper.to_array(inits[stored]).astype(np.int32)
        scale = numpy_helper.to_array(inits[node.input[1]])
        np.testing.assert_array_equal(q, rec.q)
        np.testing.assert_array_equal(scale, rec.scale)
        assert scale.shape == ((rec.q.shape[0],) if granularity == "channel" else ())
        if scheme == "asymmetric":
            zero = numpy_helper.to_array(inits[node.input[2]]).astype(np.int32)
            np.testing.assert_array_equal(zero, rec.zero_point)
            if granularity == "channel":
                assert zero.any()  # real zero points, not all 0
        elif len(node.input) > 2:
            assert not numpy_helper.to_array(inits[node.input[2]]).any()
        # dequantized artifact weight == the torch model's weight, exactly
        w = dict(out.model.named_parameters())[f"{layer}.weight"].detach().numpy()
        np.testing.assert_allclose(rec.dequantize(), w, rtol=0, atol=1e-7)
    # the 8-bit layers run on ORT's int8 kernels (asymmetric int8 weights included)
    assert art.meta["kernels"].get("QLinearConv", 0) == 1
    assert art.meta["kernels"].get("QGemm", 0) == 1
    # outputs: activations of the 8-bit layers are uint8 in the artifact, float in torch
    x, y = digits_task.test
    got, ref = _run(backend, art, x), out.model(x).detach().numpy()
    assert np.abs(got - ref).max() <= 0.1 * np.abs(ref).max()
    assert np.mean(got.argmax(1) == ref.argmax(1)) >= 0.95


@pytest.mark.parametrize(("scheme", "granularity"), GRIDS)
def test_weight_only_artifact_equals_torch_fake_quant(scheme, granularity, tmp_path, backend):
    """No activation quantization at 2-4 bits: the ORT output equals the torch model's (float tolerance)."""
    task = _task("plain_cnn")
    teacher = task.model_fn().eval()
    grid = {"quant_scheme": scheme, "quant_granularity": granularity}
    plan = Plan(layers={n: LayerPlan(bits=3, **grid) for n, _ in compressible_layers(teacher)}, epochs=0)
    out = compress(task, teacher, plan)
    art = backend.lower(out.model, task.example_inputs(), out.lowering, tmp_path, task.calibration_inputs())
    x = task.test[0]
    np.testing.assert_allclose(_run(backend, art, x), out.model(x).detach().numpy(), atol=1e-4, rtol=1e-4)
    int4 = [i for i in _graph(art).initializer if i.data_type == TensorProto.INT4]
    assert len(int4) == 3 * (2 if scheme == "asymmetric" else 1)  # weights (+ INT4 zero points)


# -- activation calibration ------------------------------------------------------------------------
def test_percentile_calibration_clips_activation_ranges(tmp_path, backend, digits_task, digits_teacher):
    layers = {n: LayerPlan(bits=8) for n, _ in compressible_layers(digits_teacher)}
    scales = {}
    accs = {}
    for method in ("minmax", "percentile"):
        out = compress(digits_task, digits_teacher, Plan(layers=layers, epochs=0, calibration=method))
        art = backend.lower(
            out.model,
            digits_task.example_inputs(),
            out.lowering,
            tmp_path / method,
            digits_task.calibration_inputs(),
        )
        g = _graph(art)
        inits = {i.name: i for i in g.initializer}
        scales[method] = {
            n.input[1]: float(numpy_helper.to_array(inits[n.input[1]]))
            for n in g.node
            if n.op_type == "QuantizeLinear"
        }
        x, y = digits_task.test
        accs[method] = backend.evaluate(art, x.numpy(), y.numpy(), digits_task.score)
    assert scales["minmax"].keys() == scales["percentile"].keys()
    pairs = [(scales["percentile"][k], scales["minmax"][k]) for k in scales["minmax"]]
    assert all(p <= m * (1 + 1e-6) for p, m in pairs)  # a percentile range never exceeds min-max
    assert sum(p < 0.99 * m for p, m in pairs) >= 1  # and clips the outliers of at least one tensor
    assert abs(accs["percentile"] - accs["minmax"]) <= 0.05


# -- dynamic quantization ----------------------------------------------------------------------------
@pytest.mark.parametrize(("scheme", "granularity"), [("symmetric", "channel"), ("asymmetric", "tensor")])
def test_dynamic_linear_layers_on_the_transformer(scheme, granularity, tmp_path, backend):
    task = _task("transformer")
    teacher = task.model_fn().eval()
    names = [i.name for i in build_inventory(teacher, task.example_inputs())]
    dynamic = ["layers.0.mlp.0", "layers.1.attn.q", "head"]  # MatMul and Gemm (2-D input) layers
    grid = {"quant_scheme": scheme, "quant_granularity": granularity}
    layers = {n: LayerPlan(bits=8, quant_mode="dynamic", **grid) for n in dynamic}
    layers["layers.0.attn.v"] = LayerPlan(bits=8)  # static QDQ
    layers["layers.1.mlp.2"] = LayerPlan(bits=16)
    plan = Plan(layers=layers, epochs=0)
    out = compress(task, teacher, plan, reduce_range=backend.reduce_range)
    art = backend.lower(out.model, task.example_inputs(), out.lowering, tmp_path, task.calibration_inputs())
    g = _graph(art)
    ops = [n.op_type for n in g.node]
    assert ops.count("MatMulInteger") == len(dynamic)
    assert ops.count("DynamicQuantizeLinear") == len(dynamic)  # one per distinct input tensor here
    inits = {i.name: i for i in g.initializer}
    for n in g.node:  # the QAT integers are what MatMulInteger multiplies by
        if n.op_type == "MatMulInteger":
            assert inits[n.input[1]].data_type == TensorProto.INT8
    rec = out.lowering.layer("head").weight
    mm = next(n for n in g.node if n.op_type == "MatMulInteger" and n.input[1].startswith("head.weight"))
    np.testing.assert_array_equal(numpy_helper.to_array(inits[mm.input[1]]).T, rec.q)
    np.testing.assert_array_equal(numpy_helper.to_array(inits[mm.input[3]]), rec.zero_point)
    base = mm.input[1].removesuffix("_quantized")
    np.testing.assert_array_equal(numpy_helper.to_array(inits[f"{base}_scale"]), rec.scale)
    assert rec.scale.shape == ((10,) if granularity == "channel" else ())
    if scheme == "asymmetric":
        zeros = [numpy_helper.to_array(inits[n.input[3]]) for n in g.node if n.op_type == "MatMulInteger"]
        assert any(z.any() for z in zeros)
    # the other layers keep their own precision: one static QDQ layer (int8 weight behind a
    # DequantizeLinear, run as QLinearMatMul), one float16 layer, the rest float MatMuls
    int8_dq = [n for n in g.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert len(int8_dq) == 1 and inits[int8_dq[0].input[0]].data_type == TensorProto.INT8
    assert sum(i.data_type == TensorProto.FLOAT16 for i in g.initializer) == 1
    assert ops.count("MatMul") == len(names) - len(dynamic) + 4  # + the 4 attention products
    kernels = art.meta["kernels"]
    assert kernels.get("DynamicQuantizeMatMul", 0) + kernels.get("MatMulInteger", 0) == len(dynamic)
    assert kernels.get("QLinearMatMul", 0) == 1
    x = task.test[0]
    got, ref = _run(backend, art, x), out.model(x).detach().numpy()
    assert np.abs(got - ref).max() <= 0.05 * np.abs(ref).max()
    assert np.mean(got.argmax(1) == ref.argmax(1)) >= 0.9


@pytest.mark.parametrize("head_bits", [32, 8])
def test_dynamic_lstm(head_bits, tmp_path, backend):
    """The LSTM runs as DynamicQuantizeLSTM; the head keeps its own precision (float, or static int8 QDQ
    calibrated on the graph that already holds the dynamic LSTM)."""
    task = _task("lstm")
    teacher = task.model_fn().eval()
    layers = {"lstm": LayerPlan(bits=8, quant_mode="dynamic"), "head": LayerPlan(bits=head_bits)}
    out = compress(task, teacher, Plan(layers=layers, epochs=0), reduce_range=backend.reduce_range)
    assert out.layer_bits["lstm"] == 8
    art = backend.lower(out.model, task.example_inputs(), out.lowering, tmp_path, task.calibration_inputs())
    ops = [n.op_type for n in _graph(art).node]
    assert ops.count("DynamicQuantizeLSTM") == 1 and "LSTM" not in ops
    assert "Gemm" in ops and "MatMulInteger" not in ops  # the head is not dynamic
    assert ("QGemm" in art.meta["kernels"]) == (head_bits == 8)
    # packed size: LSTM weight matrices (and an 8-bit head's) at 1 byte each, everything else float32
    int8 = [n for n, _ in teacher.named_parameters() if n.startswith("lstm.weight")]
    int8 += ["head.weight"] if head_bits == 8 else []
    params = dict(teacher.named_parameters())
    float_bytes = 4 * sum(p.numel() for p in params.values())
    assert art.packed_size_bytes == float_bytes - 3 * sum(params[n].numel() for n in int8)
    x = task.test[0]
    got, ref = _run(backend, art, x), out.model(x).detach().numpy()
    assert np.abs(got - ref).max() <= (0.05 if head_bits == 32 else 0.15) * np.abs(ref).max()
    assert np.mean(got.argmax(1) == ref.argmax(1)) >= 0.9


@pytest.mark.parametrize(("scheme", "granularity"), GRIDS)
def test_eight_bit_grids_keep_output_snr_above_40_db(scheme, granularity):
    torch.manual_seed(0)
    layer, x = nn.Linear(64, 32), torch.randn(256, 64)
    ref = layer(x).detach()
    add_fake_quant(layer, 8, scheme=scheme, granularity=granularity)
    with torch.no_grad():
        err = layer(x) - ref
    assert float(10 * torch.log10(ref.pow(2).mean() / err.pow(2).mean())) > 40  # measured: 48.0-48.4 dB


def test_dynamic_errors(tmp_path, backend, digits_task, digits_teacher):
    plan = Plan(layers={"features.3": LayerPlan(bits=8, quant_mode="dynamic")}, epochs=0)
    with pytest.raises(TechniqueError, match=r"layers\.features\.3\.quant_mode: dynamic .* not Conv2d"):
        compress(digits_task, digits_teacher, plan)
    lstm_task = _task("lstm")
    with pytest.raises(TechniqueError, match=r"layers\.lstm: LSTM layers are quantized dynamically only"):
        compress(lstm_task, lstm_task.model_fn().eval(), Plan(layers={"lstm": LayerPlan(bits=8)}))

    class GRUNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.gru = nn.GRU(8, 16, batch_first=True)
            self.head = nn.Linear(16, 4)

        def forward(self, x):
            return self.head(self.gru(x)[0][:, -1])

    gru = GRUNet().eval()
    spec = LoweringSpec({"gru": LayerLowering(8, "dynamic")})
    x = torch.randn(4, 5, 8)
    with pytest.raises(BackendError, match="dynamic quantization of GRU is not supported"):
        backend.lower(gru, (x,), spec, tmp_path, x.numpy())


# -- post-training quantization and LSQ ------------------------------------------------------------
def test_post_training_quantization_is_the_zero_epoch_rung(tmp_path, backend, digits_task, digits_teacher):
    layers = {n: LayerPlan(bits=8) for n, _ in compressible_layers(digits_teacher)}
    out = compress(
        digits_task, digits_teacher, Plan(layers=layers, epochs=0), reduce_range=backend.reduce_range
    )
    assert out.losses == []  # no fine-tuning step ran
    art = backend.lower(
        out.model, digits_task.example_inputs(), out.lowering, tmp_path, digits_task.calibration_inputs()
    )
    x, y = digits_task.test
    teacher_acc = float((digits_teacher(x).argmax(1) == y).float().mean())
    art_acc = backend.evaluate(art, x.numpy(), y.numpy(), digits_task.score)
    assert art_acc >= teacher_acc - 0.03
    assert art.meta["kernels"].get("QLinearConv", 0) >= 1


def test_lsq_gradient_scale_and_learning():
    """The step's gradient is LSQ's, times ``g = 1/sqrt(n * qmax)``; the weights' is straight-through."""
    torch.manual_seed(0)
    w = torch.randn(4, 16)
    fq = LSQFakeQuant(w, bits=4)
    assert isinstance(fq.log_scale, nn.Parameter) and fq.scale.shape == (4, 1)
    torch.testing.assert_close(fq.scale, weight_qparams(w, 4)[0])  # starts from the min-max step
    with torch.no_grad():  # a smaller step than min-max: some weights now clip at +-7
        fq.log_scale.sub_(0.4)
    c = torch.randn(4, 16)  # an arbitrary upstream gradient
    w.requires_grad_()
    (fq(w) * c).sum().backward()
    # d/ds of (clamp(round(w/s)) * s): round(w/s) - w/s inside the grid, the clipped level outside
    s = fq.scale.detach()
    v = w.detach() / s
    inside = (v >= -7) & (v <= 7)
    assert 0 < int((~inside).sum()) < w.numel() // 2  # both branches of the derivative occur
    dq_ds = torch.where(inside, torch.round(v) - v, torch.round(v.clamp(-7, 7)))
    g = 1 / np.sqrt(16 * 7)  # 16 weights per (per-channel) step, qmax 7
    expected = g * s * (c * dq_ds).sum(1, keepdim=True)  # chain rule through s = exp(log_scale)
    assert float(expected.abs().min()) > 1e-3  # the comparison below is not between near-zeros
    torch.testing.assert_close(fq.log_scale.grad, expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w.grad, c * inside)  # straight-through inside the range, zero where clipped


def test_lsq_scale_is_trained_and_is_what_the_artifact_uses(tmp_path, backend, digits_task, digits_teacher):
    layers = {n: LayerPlan(bits=4) for n, _ in compressible_layers(digits_teacher)}
    layers["classifier"] = LayerPlan(bits=8)
    plan = Plan(layers=layers, epochs=2, lsq=True, lr=1e-3)
    x, y = digits_task.train
    small = dataclasses.replace(digits_task, train=(x[:192], y[:192]))  # a short fine-tune
    initial = {}
    for name, m in compressible_layers(digits_teacher):
        if name in layers:
            initial[name] = weight_qparams(m.weight.detach(), layers[name].bits)[0].flatten().numpy()
    out = compress(small, digits_teacher, plan, reduce_range=backend.reduce_range)
    assert len(out.losses) == 2
    for name in ("features.0", "features.3"):
        rec = out.lowering.layer(name).weight
        assert rec.lsq
        assert np.abs(rec.scale - initial[name]).max() > 1e-3 * np.abs(initial[name]).max()  # it moved
    art = backend.lower(
        out.model, digits_task.example_inputs(), out.lowering, tmp_path, digits_task.calibration_inputs()
    )
    inits = {i.name: numpy_helper.to_array(i) for i in _graph(art).initializer}
    np.testing.assert_array_equal(
        inits["features.3.weight_int4_scale"], out.lowering.layer("features.3").weight.scale
    )
    np.testing.assert_array_equal(
        inits["classifier.weight_scale"], out.lowering.layer("classifier").weight.scale
    )
    x, y = digits_task.test
    got, ref = _run(backend, art, x), out.model(x).detach().numpy()
    # the 4-bit layers are weight-only (exact); the 8-bit classifier's input and the logits are uint8
    assert np.abs(got - ref).mean() <= 0.02 * np.abs(ref).max()
    assert np.mean(got.argmax(1) == ref.argmax(1)) >= 0.95
    torch_acc = float((out.model(x).argmax(1) == y).float().mean())
    assert abs(backend.evaluate(art, x.numpy(), y.numpy(), digits_task.score) - torch_acc) <= 0.02


# -- search space ----------------------------------------------------------------------------------
def test_quant_depth_space_suggests_the_new_choices(digits_teacher, digits_task):
    import optuna

    space = SearchSpace.from_file(ROOT / "autocompress" / "search_spaces" / "quant_depth.yaml")
    inv = build_inventory(digits_teacher, digits_task.example_inputs())
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(40):
        trial = study.ask()
        plan = space.suggest(trial, inv, epochs=0, lr=1e-3, seed=0)
        assert Plan.from_json(plan.to_json()) == plan
        for lp in plan.layers.values():
            seen.add((lp.quant_scheme, lp.quant_granularity))
            seen.add(lp.quant_mode)
        seen.add(plan.calibration)
        assert "quant.calibration" in trial.params and "quant.lsq" in trial.params
        for info in inv:  # grid choices are asked only where there is an integer grid
            bits = plan.layers[info.name].bits
            assert (f"qscheme.{info.name}" in trial.params) == (bits <= 8)
            assert (f"qgranularity.{info.name}" in trial.params) == (bits <= 8)
            searched_mode = info.name == "classifier" and bits == 8  # the yaml's Linear regex
            assert (f"qmode.{info.name}" in trial.params) == searched_mode
            if bits >= 16:
                assert plan.layers[info.name].quant_scheme == "symmetric"
        study.tell(trial, 0.0)
    assert {"percentile", "minmax", "dynamic", ("asymmetric", "tensor"), ("symmetric", "channel")} <= seen


def test_space_rejects_bad_quant_values():
    with pytest.raises(ConfigError, match=r"quant_scheme.*'affine' is not one of"):
        SearchSpace.from_dict({"quant_scheme": {"choices": ["symmetric", "affine"]}})
    with pytest.raises(ConfigError, match=r"quant\.calibration.*'entropy' is not one of"):
        SearchSpace.from_dict({"quant": {"calibration": {"fixed": "entropy"}}})
    with pytest.raises(ConfigError, match=r"quant_mode.*'dynamic' needs bits 8"):
        SearchSpace.from_dict({"bits": {"fixed": 4}, "quant_mode": {"fixed": "dynamic"}})


@pytest.mark.parametrize("rank_ratio", [1.0, 0.5])
def test_static_convs_feeding_a_dynamic_classifier_lower_to_a_valid_graph(rank_ratio, tmp_path, backend):
    """int8 static convs whose pooled, flattened output feeds a dynamic int8 classifier (whole or
    factorized): both quantizers name a quantizer node after that tensor; the artifact must still load
    (ORT refused it: 'two nodes with same node name') and match the torch model."""
    task = _task("plain_cnn")
    teacher = task.model_fn().eval()
    layers = {
        "features.0": LayerPlan(bits=8),
        "features.3": LayerPlan(bits=8),
        "classifier": LayerPlan(bits=8, quant_mode="dynamic", rank_ratio=rank_ratio),
    }
    out = compress(task, teacher, Plan(layers=layers, epochs=0), reduce_range=backend.reduce_range)
    art = backend.lower(out.model, task.example_inputs(), out.lowering, tmp_path, task.calibration_inputs())
    g = _graph(art)
    names = [n.name for n in g.node if n.name]
    assert len(names) == len(set(names))
    assert "DynamicQuantizeLinear" in {n.op_type for n in g.node}
    x = task.test[0]
    got, ref = _run(backend, art, x), out.model(x).detach().numpy()
    assert np.abs(got - ref).max() <= 0.1 * np.abs(ref).max()


def test_a_post_training_record_keeps_the_weight_before_rounding(digits_task, digits_teacher):
    """Post-training, each static int8 layer's record keeps the weight it was rounded from (bias
    correction's float reference: the student's own weights are on the grid already); a fine-tuned
    record does not (the weight moved on the grid), nor does a dynamic layer's."""
    names = [n for n, _ in compressible_layers(digits_teacher)]
    layers = {n: LayerPlan(bits=8) for n in names}
    layers[names[-1]] = LayerPlan(bits=8, quant_mode="dynamic")
    post = compress(digits_task, digits_teacher, Plan(layers=layers, epochs=0))
    teacher = dict(fold_batchnorm(copy.deepcopy(digits_teacher))[0].named_modules())  # as compress has it
    for name in names[:-1]:
        record = post.lowering.layer(name).weight
        np.testing.assert_array_equal(record.source, teacher[name].weight.detach().numpy())
        assert np.abs(record.dequantize() - record.source).max() > 0  # the integers are the rounded form
    assert post.lowering.layer(names[-1]).weight.source is None
    tuned = compress(digits_task, digits_teacher, Plan(layers=layers, steps=2))
    assert all(tuned.lowering.layer(n).weight.source is None for n in names)
