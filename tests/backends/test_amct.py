"""The AMCT graph check: it accepts the project's int8 artifacts lowered for ascend (real QDQ graphs
made by the onnxruntime lowering with the QAT integers) and rejects, naming the node, every documented
constraint a hand-made graph breaks. What AMCT itself then does with an accepted graph is only visible
on an Ascend host (``autocompress doctor --device npu``)."""

from __future__ import annotations

import numpy as np
import onnx
import optuna
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn
from torch.nn.utils import parametrize

from autocompress.backends import OnnxRuntimeBackend
from autocompress.backends.amct import amct_violations, check_amct_qat_graph, qdq_for_amct
from autocompress.errors import BackendError
from autocompress.inventory import build_inventory, compressible_layers
from autocompress.lowering import LayerLowering, LoweringSpec
from autocompress.space import SearchSpace
from autocompress.techniques import fold_batchnorm
from autocompress.techniques.quantize import add_fake_quant, record_weight_quant
from autocompress.testing import PlainCNN, ResNetStyle, TinyTransformer


def _int8(cls, linear_grid: str):
    """A reference model with BN folded and 8-bit QAT integers recorded as a trial's finalize step does
    (conv weights per channel, Linear weights on ``linear_grid``)."""
    torch.manual_seed(0)
    model = fold_batchnorm(cls().eval())[0]
    layers = {}
    for name, mod in compressible_layers(model):
        add_fake_quant(mod, 8, granularity=linear_grid if isinstance(mod, nn.Linear) else "channel")
        layers[name] = LayerLowering(8, "static", record_weight_quant(mod))
        parametrize.remove_parametrizations(mod, "weight", leave_parametrized=True)
    return model, LoweringSpec(layers)


def _reference_run(path, x: torch.Tensor) -> np.ndarray:
    """ONNX Runtime without graph optimizations: every Q/DQ executed as written (no fusion differences)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x.numpy()})[0]


def _weight_scales(model: onnx.ModelProto) -> dict[str, tuple[int, np.ndarray]]:
    """op type and weight-scale array of every quantized Conv / Gemm / MatMul, by node name."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    out = {}
    for n in model.graph.node:
        if n.op_type in ("Conv", "Gemm", "MatMul") and n.input[1] in producer:
            dq = producer[n.input[1]]
            if dq.op_type == "DequantizeLinear" and dq.input[0] in inits:
                out[n.name] = (n.op_type, inits[dq.input[1]])
    return out


@pytest.mark.parametrize("cls", [ResNetStyle, TinyTransformer], ids=["conv-heavy", "linear-heavy"])
def test_project_int8_artifacts_pass_the_check_and_keep_the_trained_integers(tmp_path, cls):
    model, precisions = _int8(cls, "tensor")
    x = cls.example_inputs(32)[0]
    path = tmp_path / "model.onnx"
    meta = qdq_for_amct(model, cls.example_inputs(), precisions, path, x.numpy())
    qdq = onnx.load(str(path))
    onnx.checker.check_model(qdq)
    assert amct_violations(qdq) == []
    scales = _weight_scales(qdq)
    kinds = {op for op, _ in scales.values()}
    assert kinds == ({"Conv", "Gemm"} if cls is ResNetStyle else {"MatMul", "Gemm"})
    for name, (op, scale) in scales.items():  # Gemm / MatMul per tensor; Conv per output channel
        assert (scale.size == 1) == (op != "Conv"), name
    # every layer is quantized and holds exactly its QAT integers
    inits = {i.name: numpy_helper.to_array(i) for i in qdq.graph.initializer}
    assert len(scales) == len(precisions.layers)
    for layer, _ in compressible_layers(model):
        record = precisions.layer(layer).weight
        forms = [record.q, record.q.T] if record.q.ndim == 2 else [record.q]  # MatMul stores [in, out]
        stored = [v for v in inits.values() if v.dtype == np.int8]
        assert any(v.shape == f.shape and np.array_equal(v, f) for v in stored for f in forms), layer
    # the graph still computes the model: ONNX Runtime runs it, and it is at least as close to the torch
    # model as the onnxruntime artifact (operators AMCT does not adapt read float tensors, as in torch)
    ort = OnnxRuntimeBackend("cpu", isolate=False)
    ort.reduce_range = False
    ort.int8_connectors = False  # the same Q/DQ placement as the graph made for AMCT
    plain = ort.lower(model, cls.example_inputs(), precisions, tmp_path / "ort", calibration=x.numpy())
    with torch.no_grad():
        ref = model(x).numpy()
    err, ort_err = (np.abs(_reference_run(p, x) - ref).mean() for p in (path, plain.path))
    assert err <= 1.1 * ort_err + 1e-4 and err <= 0.05 * np.abs(ref).max()
    assert not any(  # no dangling Q/DQ left behind by the rewiring
        n.op_type.endswith("QuantizeLinear")
        and not any(o in {i for m in qdq.graph.node for i in m.input} for o in n.output)
        for n in qdq.graph.node
    )
    if cls is TinyTransformer:
        assert meta["rewired_to_float"] > 0  # Shape nodes read the float tensor, not the Q/DQ pair


@pytest.mark.parametrize(
    ("cls", "node"),
    [(PlainCNN, "/classifier/Gemm"), (TinyTransformer, "/embed/MatMul")],
    ids=["gemm", "matmul"],
)
def test_per_channel_linear_weights_are_refused_naming_the_node(tmp_path, cls, node):
    model, precisions = _int8(cls, "channel")
    op = node.rsplit("/", 1)[1]
    with pytest.raises(
        BackendError,
        match=rf"model.onnx \(QDQ int8 for AMCT\): not adaptable by AMCT: node '{node}' \({op}\): its weight "
        rf"is quantized per channel \(\d+ scales in '.+'\); AMCT adapts {op} with per-tensor weights only",
    ):
        qdq_for_amct(
            model, cls.example_inputs(), precisions, tmp_path / "model.onnx", cls.example_inputs(8)[0].numpy()
        )
    assert not (tmp_path / "model.onnx").exists()  # nothing is handed on


def test_the_space_asks_only_per_tensor_grids_for_linear_layers_on_ascend():
    from autocompress.backends import AscendBackend

    model = PlainCNN()
    inventory = build_inventory(model, PlainCNN.example_inputs())
    space = SearchSpace.from_dict(
        {"bits": {"fixed": 8}, "quant_granularity": {"choices": ["channel", "tensor"]}}
    )
    space.granularity_by_kind = dict(AscendBackend.weight_granularity)
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    plan = space.suggest(trial, inventory, epochs=1, lr=1e-3, seed=0)
    assert plan.layers["classifier"].quant_granularity == "tensor"
    assert "qgranularity.classifier" not in trial.params  # not asked: the device runs one grid there
    convs = [i.name for i in inventory if i.kind != "Linear"]
    assert {f"qgranularity.{c}" for c in convs} <= set(trial.params)  # conv grids are still searched
    fixed = SearchSpace.from_dict({"bits": {"fixed": 8}})  # the default grid (channel) is fixed
    fixed.granularity_by_kind = dict(AscendBackend.weight_granularity)
    plan = fixed.suggest(optuna.create_study().ask(), inventory, epochs=1, lr=1e-3, seed=0)
    assert plan.layers["classifier"].quant_granularity == "tensor"
    assert all(plan.layers[c].quant_granularity == "channel" for c in convs)


# -- hand-made graphs: one valid base, each variant breaks one rule ------------------------------
def _t(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def _graph(
    op="Conv",
    x_type=TensorProto.FLOAT,
    w_scale=None,
    w_axis=0,
    dq_scale=0.05,
    x_scale=0.05,
    consumer=None,
    attrs=None,
    w_shape=None,
    quantize_input=True,
    integer_op=False,
):
    """x -> Q -> DQ -> op(W behind DQ) -> y, with one knob per rule."""
    conv = op in ("Conv", "ConvTranspose")
    w_shape = w_shape or ((4, 2, 3, 3) if conv else (8, 4))
    x_shape = [1, 2, 6, 6] if conv else [1, w_shape[0] if op == "MatMul" else w_shape[1]]
    nodes, inits = [], [_t("w_q", np.ones(w_shape, np.int8)), _t("w_zero", np.int8(0))]
    out_channels = w_shape[1] if op == "ConvTranspose" else w_shape[0]
    if w_scale is None:
        w_scale = np.full(out_channels, 0.01, np.float32) if conv else np.float32(0.01)
    inits.append(_t("w_scale", np.asarray(w_scale, np.float32)))
    dq_axis = {"axis": w_axis} if np.ndim(w_scale) else {}
    nodes.append(
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w"], name="w_dq", **dq_axis)
    )
    inits += [_t("x_scale", np.float32(x_scale)), _t("x_zero", np.uint8(128))]
    inits += [_t("dq_scale", np.asarray(dq_scale, np.float32))]
    x = "x"
    if quantize_input:
        q_axis = {"axis": 1} if np.ndim(x_scale) else {}
        nodes.append(
            helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["x_q"], name="x_q", **q_axis)
        )
        nodes.append(
            helper.make_node(
                "DequantizeLinear", ["x_q", "dq_scale", "x_zero"], ["x_dq"], name="x_dq", **q_axis
            )
        )
        x = "x_dq"
    if integer_op:
        nodes.append(helper.make_node("DynamicQuantizeLinear", ["x"], ["xi", "xs", "xz"], name="dyn_q"))
    nodes.append(helper.make_node(op, [x, "w"], ["y"], name="layer", **(attrs or {})))
    if consumer:
        nodes.append(helper.make_node(consumer, [x], ["z"], name="side"))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if consumer:
        outputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, None))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", x_type, x_shape)], outputs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("op", ["Conv", "ConvTranspose", "Gemm", "MatMul"])
def test_a_valid_hand_made_graph_passes(op):
    kw = {"w_axis": 1} if op == "ConvTranspose" else {}
    check_amct_qat_graph(
        _graph(op, **kw)
    )  # the base graphs are valid: each rejection below is its one change


@pytest.mark.parametrize(
    ("graph", "message"),
    [
        (
            _graph("Gemm", w_scale=np.full(8, 0.01)),
            r"node 'layer' \(Gemm\): its weight is quantized per channel \(8 scales in 'w_dq'\); "
            r"AMCT adapts Gemm with per-tensor weights only",
        ),
        (
            _graph("MatMul", w_scale=np.full(4, 0.01), w_axis=1),
            r"node 'layer' \(MatMul\): its weight is quantized per channel \(4 scales in 'w_dq'\)",
        ),
        (
            _graph(dq_scale=0.06),
            r"node 'x_dq' \(DequantizeLinear\): its scale / zero point differ from those of its QuantizeLinear "
            r"'x_q'; a QuantizeLinear/DequantizeLinear pair must have the same quantization factors",
        ),
        (
            _graph(x_type=TensorProto.FLOAT16),
            r"node 'x_q' \(QuantizeLinear\): quantizes 'x', which is FLOAT16; AMCT takes float32 inputs only",
        ),
        (
            _graph(x_scale=np.full(2, 0.05), dq_scale=np.full(2, 0.05)),
            r"node 'x_q' \(QuantizeLinear\): quantizes an activation per channel \(2 scales\); "
            r"AMCT supports per-channel quantization for weights only",
        ),
        (
            _graph(consumer="Relu"),
            r"node 'side' \(Relu\): consumes the quantized activation 'x_dq'; AMCT adapts only Conv, "
            r"ConvTranspose, Gemm, MatMul, Add",
        ),
        (
            _graph("Gemm", attrs={"transA": 1}, w_shape=(4, 4)),
            r"node 'layer' \(Gemm\): transA = 1; AMCT adapts Gemm with transA = 0 only",
        ),
        (
            _graph(w_axis=1),
            r"node 'layer' \(Conv\): its weight scales \(4, axis 1\) are neither per tensor nor per output "
            r"channel \(axis 0, 4 channels\)",
        ),
        (
            _graph("ConvTranspose", w_axis=1, attrs={"dilations": [2, 2]}),
            r"node 'layer' \(ConvTranspose\): dilations are not 1",
        ),
        (
            _graph(quantize_input=False),
            r"node 'layer' \(Conv\): its weight is quantized but its input is not",
        ),
        (
            _graph(integer_op=True),
            r"node 'dyn_q' \(DynamicQuantizeLinear\): integer-operator quantization .* cannot be adapted",
        ),
    ],
    ids=[
        "per-channel-gemm",
        "per-channel-matmul",
        "qdq-scale-mismatch",
        "float16-input",
        "per-channel-activation",
        "relu-reads-qdq",
        "gemm-transA",
        "conv-wrong-axis",
        "convtranspose-dilation",
        "weight-only",
        "dynamic-int8",
    ],
)
def test_hand_made_violations_are_refused_naming_the_node(graph, message):
    with pytest.raises(BackendError, match=r"^m\.onnx: not adaptable by AMCT: " + message):
        check_amct_qat_graph(graph, where="m.onnx")
