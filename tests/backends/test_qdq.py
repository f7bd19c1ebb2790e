"""int8 artifacts stay int8 across Relu, pooling, residual Adds and Concats, as ORT's own quantizer does."""

from __future__ import annotations

import copy
import statistics
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from autocompress.backends import OnnxRuntimeBackend, qdq
from autocompress.backends.base import time_callables
from autocompress.backends.onnxruntime import _Calibration, _quiet, export_onnx, make_session
from autocompress.backends.qdq import int8_region
from autocompress.inventory import compressible_layers
from autocompress.techniques import fold_batchnorm
from autocompress.testing import BasicBlock


class _Branchy(nn.Module):
    """Stem conv + Relu, MaxPool, a residual block (Add), two branches joined by Concat, a 1x1 conv
    over the concatenation, global average pooling, Linear: every connector the int8 region crosses."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.pool = nn.MaxPool2d(2)
        self.block = BasicBlock(width, width)
        self.left = nn.Sequential(nn.Conv2d(width, width, 1), nn.ReLU())
        self.right = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU())
        self.mix = nn.Sequential(nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU())
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, 10)

    def forward(self, x):
        x = self.block(self.pool(self.stem(x)))
        x = self.mix(torch.cat([self.left(x), self.right(x)], 1))
        return self.fc(torch.flatten(self.gap(x), 1))


def _model(width: int = 32) -> nn.Module:
    torch.manual_seed(0)
    model = _Branchy(width)
    for m in model.modules():  # BN statistics of a trained net: distinct, non-zero folded biases
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return fold_batchnorm(model.eval())[0]


def _optimized_ops(path, tmp_path) -> Counter:
    out = tmp_path / f"{path.stem}.opt.onnx"
    make_session(path, 1, out)
    return Counter(n.op_type for n in onnx.load(str(out)).graph.node)


def _ort_quantize_static(float_path, out, calibration: np.ndarray, reduce_range: bool):
    """ONNX Runtime's one-liner a user would try: QDQ, per-channel int8 weights, every op it knows."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    with _quiet():
        quantize_static(
            str(float_path),
            str(out),
            _Calibration(calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=reduce_range,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )


def test_int8_region_crosses_connectors_and_stops_at_float_ops(tmp_path):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.b = nn.Conv2d(8, 8, 3, padding=1)
            self.c = nn.Conv2d(8, 8, 3, padding=1)
            self.d = nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x):
            x = torch.relu(self.a(x))  # int8 -> Relu: in the region
            y = torch.relu(self.b(x)) + x  # residual Add of two int8 tensors: in
            z = torch.sigmoid(self.c(y))  # no int8 kernel: the region stops at the Sigmoid
            return torch.relu(self.d(z)) + 1.0  # Add with a constant: stays float

    path = tmp_path / "net.onnx"
    export_onnx(Net().eval(), (torch.rand(1, 3, 8, 8),), path)
    graph = onnx.load(str(path)).graph
    convs = [n.name for n in graph.node if n.op_type == "Conv"]
    kinds = {n.name: n.op_type for n in graph.node}
    region = int8_region(graph, convs)
    added = Counter(kinds[n] for n in region if n not in convs)
    # Relu after a, after b, and the residual Add; the Relu after d is in too (its input is int8),
    # the Sigmoid and the constant Add are not
    assert added == Counter({"Relu": 3, "Add": 1})
    assert not any(kinds[n] == "Sigmoid" for n in region)
    # with conv b kept float, its Relu and the Add (one float input) leave the region as well
    region = int8_region(graph, [convs[0], convs[2], convs[3]])
    assert Counter(kinds[n] for n in region if n not in convs) == Counter({"Relu": 2})


def test_int8_everywhere_is_as_lean_and_as_fast_as_ort_quantize_static(tmp_path):
    model = _model(48)
    torch.manual_seed(1)
    x = torch.rand(128, 3, 32, 32)
    be = OnnxRuntimeBackend()
    f32 = be.lower(copy.deepcopy(model), (x[:1],), {}, tmp_path / "f32")
    names = [n for n, _ in compressible_layers(model)]
    ours = be.lower(copy.deepcopy(model), (x[:1],), {n: 8 for n in names}, tmp_path / "ours", x.numpy())
    theirs = tmp_path / "ort.onnx"
    _ort_quantize_static(f32.path, theirs, x.numpy(), be.reduce_range)

    k_ours, k_ort = _optimized_ops(ours.path, tmp_path), _optimized_ops(theirs, tmp_path)
    print("autocompress:", dict(k_ours), "\nquantize_static:", dict(k_ort))
    for op in ("QuantizeLinear", "DequantizeLinear"):
        assert k_ours[op] <= k_ort[op], op
    # the input in; the classifier's QGemm gives float logits (ORT's own artifact: one more pair)
    assert k_ours["QuantizeLinear"] == 1 and k_ours["DequantizeLinear"] == 0
    assert k_ours["QLinearConv"] == k_ort["QLinearConv"] == len(names) - 1  # + the QGemm
    for op in ("QLinearAdd", "QLinearConcat", "QLinearGlobalAveragePool", "QGemm"):
        assert k_ours[op] == 1, op
    for op in ("Relu", "Conv", "Add", "Concat", "GlobalAveragePool", "MaxPool"):
        assert k_ours[op] == 0, op  # nothing of the int8 region runs in float

    # same integers as the torch model's weight grid, same answers as ORT's artifact
    xs = x[:64].numpy()
    out_ours = make_session(ours.path, 1).run(None, {"input": xs})[0]
    out_ort = make_session(theirs, 1).run(None, {"input": xs})[0]
    out_f32 = model(x[:64]).detach().numpy()
    assert np.abs(out_ours - out_f32).max() < 0.1 * np.abs(out_f32).max()
    assert np.mean(out_ours.argmax(1) == out_ort.argmax(1)) >= 0.9

    # latency side by side (interleaved blocks); a 2-core shared machine: up to 3 tries, the median
    # of the tries must reach the bar (the old artifact, with a Q/DQ round trip at every Relu and a
    # float pool, measured 0.92 here)
    sessions = [make_session(p, 1) for p in (ours.path, theirs)]
    feed = {"input": x[:1].numpy()}
    fns = [lambda s=s: s.run(None, feed) for s in sessions]
    ratios = []
    for _ in range(3):
        a, b = time_callables(fns, device="cpu", batch_size=1, min_s=1.0, max_s=4.0)
        ratios.append(b.median_ms / a.median_ms)  # speed of ours relative to ORT's
        print(f"ours {a.median_ms:.3f} ms, quantize_static {b.median_ms:.3f} ms: {ratios[-1]:.3f}")
        if len(ratios) >= 2 and statistics.median(ratios) >= 0.97:
            break
    assert statistics.median(ratios) >= 0.97, ratios
    assert ratios == pytest.approx([statistics.median(ratios)] * len(ratios), rel=0.15)  # sane spread


def test_spatial_means_become_int8_global_pooling(tmp_path):
    class Means(nn.Module):
        """x.mean over the spatial axes, as user code writes global pooling (1-D and 2-D, keepdim or not),
        next to means the rewrite must leave alone: over the channel axis, and over a float input."""

        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 16, 3, padding=1)
            self.b = nn.Conv1d(16, 16, 3, padding=1)
            self.fc = nn.Linear(32, 10)

        def forward(self, x):
            y = torch.relu(self.a(x))  # [N, 16, 8, 8]
            pooled = y.mean((2, 3), keepdim=True).flatten(1)  # keepdims=1
            seq = torch.relu(self.b(y.flatten(2)))  # [N, 16, 64]
            per_step = seq.mean(1)  # over channels: not a pooling
            return self.fc(torch.cat([pooled, seq.mean(-1)], 1)) + per_step.sum(1, keepdim=True)

    torch.manual_seed(0)
    model = Means().eval()
    x = torch.rand(64, 3, 8, 8)
    path = tmp_path / "means.onnx"
    export_onnx(model, (x[:1],), path)
    graph_model = onnx.load(str(path))
    layers = [n.name for n in graph_model.graph.node if n.op_type in ("Conv", "Gemm")]
    assert qdq.pool_means(graph_model, layers) == 2
    kinds = Counter(n.op_type for n in graph_model.graph.node)
    assert kinds["GlobalAveragePool"] == 2 and kinds["ReduceMean"] == 1  # the channel mean stays
    onnx.checker.check_model(graph_model)
    rewritten = tmp_path / "pooled.onnx"
    onnx.save(graph_model, str(rewritten))
    feed = {"input": x.numpy()}
    before = make_session(path, 1).run(None, feed)[0]
    after = make_session(rewritten, 1).run(None, feed)[0]
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-6)
    # a mean whose input is float (no int8 layer upstream) is left as it is
    untouched = onnx.load(str(path))
    assert qdq.pool_means(untouched, []) == 0

    # through the backend: int8 everywhere, the pooling runs as QLinearGlobalAveragePool
    be = OnnxRuntimeBackend()
    names = [n for n, _ in compressible_layers(model)]
    art = be.lower(copy.deepcopy(model), (x[:1],), {n: 8 for n in names}, tmp_path / "int8", x.numpy())
    ops = _optimized_ops(art.path, tmp_path)
    assert ops["QLinearGlobalAveragePool"] == 2 and ops["ReduceMean"] == 1, dict(ops)
    out = make_session(art.path, 1).run(None, feed)[0]
    ref = model(x).detach().numpy()
    assert np.abs(out - ref).max() < 0.05 * np.abs(ref).max()


def test_a_qdq_model_with_a_scale_that_is_not_finite_is_refused():
    from onnx import TensorProto, helper, numpy_helper

    from autocompress.backends.ort_quantize import check_finite_scales
    from autocompress.errors import ExportError

    def model(scale: float) -> onnx.ModelProto:
        inits = [
            numpy_helper.from_array(np.array(scale, dtype=np.float32), "s"),
            numpy_helper.from_array(np.array(0, dtype=np.uint8), "z"),
        ]
        nodes = [
            helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="q_mask"),
            helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], name="dq_mask"),
        ]
        graph = helper.make_graph(
            nodes,
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
            inits,
        )
        return helper.make_model(graph)

    check_finite_scales(model(0.1))  # a finite, positive scale passes
    for bad in (float("inf"), float("nan"), 0.0):
        with pytest.raises(ExportError, match=r"QuantizeLinear q_mask of tensor 'x' has scale .*not finite"):
            check_finite_scales(model(bad))
