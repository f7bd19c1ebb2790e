"""Dynamic int8 layers whose input carries outlier values are lowered float, decided from calibration
data: the layer's output SQNR with its input quantized per tensor, as ORT does at run time."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

import autocompress.backends.ort_quantize as oq
from autocompress.backends.dynamic_outliers import OUTLIER_SQNR_DB, dequantized_uint8
from autocompress.backends.onnx_export import export_onnx, graph_input_names
from autocompress.config import StudyConfig
from autocompress.lowering import LayerLowering, LoweringSpec
from autocompress.rundir import build_backend


class OutlierMLP(nn.Module):
    """``b`` reads ``a``'s output, two of whose 64 dimensions are ~200x the rest, and hardly uses them
    (its weights there are 200x smaller): per-tensor input quantization leaves it nothing of the rest."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(32, 64), nn.Linear(64, 64), nn.Linear(64, 8)
        with torch.no_grad():
            self.a.weight[:2] *= 200.0
            self.b.weight[:, :2] /= 200.0

    def forward(self, x):
        return self.c(torch.relu(self.b(self.a(x))))


def _spec() -> LoweringSpec:
    return LoweringSpec({n: LayerLowering(8, "dynamic") for n in ("a", "b", "c")})


def _run(path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {graph_input_names(path)[0]: x})[0]


def _rel_error(out: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def test_dequantized_uint8_is_dynamic_quantize_linear():
    x = np.random.default_rng(0).normal(size=(4, 16)).astype(np.float32) * 3
    from onnx import TensorProto, helper

    node = helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"])
    graph = helper.make_graph(
        [node, helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 16])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(dequantized_uint8(x), session.run(None, {"x": x})[0], atol=1e-6)


def test_a_dynamic_layer_reading_outliers_is_kept_float(tmp_path):
    model = OutlierMLP().eval()
    x = np.random.default_rng(1).normal(size=(64, 32)).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    backend = build_backend(StudyConfig.model_validate({"name": "dq", "task": {"name": "digits"}}))
    art = backend.lower(model, (torch.from_numpy(x[:1]),), _spec(), tmp_path / "art", calibration=x)
    backend.close()
    kept = art.meta["dynamic_kept_float"]
    assert set(kept) == {"b"} and kept["b"] < OUTLIER_SQNR_DB
    assert "b" not in art.layer_bits and art.layer_bits == {"a": 8, "c": 8}
    assert sum(n.op_type == "MatMulInteger" for n in onnx.load(str(art.path)).graph.node) == 2
    with_check = _rel_error(_run(art.path, x), ref)

    # the same lowering with the check off quantizes b too, and loses the output
    fp32 = tmp_path / "float.onnx"
    export_onnx(model, (torch.from_numpy(x[:1]),), fp32)
    off = tmp_path / "off.onnx"
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    none = oq.quantize_graph(model, fp32, off, _spec(), x, scratch, reduce_range=False, outlier_sqnr_db=None)
    assert none == {}
    assert sum(n.op_type == "MatMulInteger" for n in onnx.load(str(off)).graph.node) == 3
    without = _rel_error(_run(off, x), ref)
    assert with_check < 0.05 < 0.3 < without, (with_check, without)
