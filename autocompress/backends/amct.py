"""AMCT for the ascend backend: the graph check run before AMCT, and the ``convert_qat_model`` call.

Documentation followed (read, not copied): CANN 8.x AMCT guide, "QAT Model Adaptation to CANN Format"
and "convert_qat_model" (hiascend.com), and the table "Layers that support uniform quantization":

* ``amct_onnx.convert_qat_model(model_file, save_path, record_file=None)`` rewrites an ONNX QAT model
  (ONNX's own QuantizeLinear / DequantizeLinear) into AscendQuant / AscendDequant and writes
  ``<save_path>_fake_quant_model.onnx`` (accuracy simulation on the CPU, ONNX Runtime) and
  ``<save_path>_deploy_model.onnx`` (the input of ATC); ``save_path`` ends with the model-name prefix.
* Adaptable: Conv and ConvTranspose (weights per channel or per tensor), Gemm (weights per tensor only,
  ``transA = 0``), single-input MatMul (weights per tensor only, 2-D constants), ConvTranspose with
  dilation 1 and 4-D filters; Add quantized per tensor. Only float32 inputs. Per-channel quantization
  applies to weights only. A QuantizeLinear / DequantizeLinear pair has the same quantization factors.

:func:`check_amct_qat_graph` enforces exactly these rules on the artifact the backend is about to hand
to AMCT and names the node that breaks one, so that a study fails that trial with the reason instead
of failing inside AMCT on a host. It does not claim that AMCT accepts every graph it passes: only an
Ascend host with AMCT can show that.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from ..errors import BackendError, MissingDependencyError
from ..lowering import LoweringSpec
from ..scratch import scratch_dir

AMCT_PACKAGE = "amct_onnx"
AMCT_HINT = (
    "install AMCT for ONNX (the amct_onnx wheel from the CANN toolkit's tools/amct folder, CANN 8.0 or "
    "later: the version whose convert_qat_model constraints this backend checks), then "
    "`source /usr/local/Ascend/ascend-toolkit/set_env.sh`"
)
WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")  # layers whose weights AMCT quantizes
ADAPTABLE = (*WEIGHT_OPS, "Add")  # operators that may consume a quantized activation
INTEGER_OPS = (
    "DynamicQuantizeLinear",
    "MatMulInteger",
    "ConvInteger",
    "QLinearConv",
    "QLinearMatMul",
    "QGemm",
    "DynamicQuantizeLSTM",
)
FAKE_QUANT_SUFFIX, DEPLOY_SUFFIX = "_fake_quant_model.onnx", "_deploy_model.onnx"


def amct_module():
    """``amct_onnx``, imported on first use (it pulls in CANN libraries)."""
    try:
        return importlib.import_module(AMCT_PACKAGE)
    except ImportError as exc:
        raise MissingDependencyError(f"{AMCT_PACKAGE} is not importable: {AMCT_HINT} ({exc})") from exc


def convert_qat(model_file: Path, save_prefix: Path, amct=None) -> tuple[Path, Path]:
    """Run ``amct_onnx.convert_qat_model(model_file, save_prefix, record_file=None)``.

    Returns:
        (fake-quant model, deploy model) paths written by AMCT.

    Raises:
        MissingDependencyError: amct_onnx is not installed.
        BackendError: AMCT raised, or did not write the two documented files.
    """
    amct = amct_module() if amct is None else amct
    save_prefix.parent.mkdir(parents=True, exist_ok=True)
    try:
        amct.convert_qat_model(str(model_file), str(save_prefix), record_file=None)
    except Exception as exc:
        raise BackendError(f"amct_onnx.convert_qat_model failed on {model_file.name}: {exc}") from exc
    fake, deploy = (Path(f"{save_prefix}{s}") for s in (FAKE_QUANT_SUFFIX, DEPLOY_SUFFIX))
    missing = [p.name for p in (fake, deploy) if not p.is_file()]
    if missing:
        found = sorted(p.name for p in save_prefix.parent.iterdir())
        raise BackendError(
            f"amct_onnx.convert_qat_model did not write {', '.join(missing)} in {save_prefix.parent} "
            f"(found: {', '.join(found) or 'nothing'})"
        )
    return fake, deploy


# -- the graph check ------------------------------------------------------------------------------
class _Graph:
    def __init__(self, model: onnx.ModelProto):
        g = model.graph
        self.inits = {i.name: i for i in g.initializer}
        self.consts = {n.output[0]: n for n in g.node if n.op_type == "Constant" and n.output}
        self.producer = {o: n for n in g.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in g.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        inferred = onnx.shape_inference.infer_shapes(model).graph
        self.types = {
            v.name: v.type.tensor_type.elem_type
            for v in [*inferred.value_info, *inferred.input, *inferred.output]
            if v.type.HasField("tensor_type")
        }
        self.types.update({name: t.data_type for name, t in self.inits.items()})
        self.outputs = {o.name for o in g.output}

    def const(self, name: str) -> np.ndarray | None:
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        node = self.consts.get(name)
        if node is not None:
            attr = next((a for a in node.attribute if a.name == "value"), None)
            return numpy_helper.to_array(attr.t) if attr is not None else None
        return None


def _label(node: onnx.NodeProto) -> str:
    return f"node {node.name or '<unnamed>'!r} ({node.op_type})"


def _attr(node: onnx.NodeProto, name: str, default=None):
    a = next((a for a in node.attribute if a.name == name), None)
    return default if a is None else onnx.helper.get_attribute_value(a)


def _qparams(g: _Graph, node: onnx.NodeProto) -> tuple[np.ndarray | None, np.ndarray | None]:
    scale = g.const(node.input[1]) if len(node.input) > 1 else None
    zero = g.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    return scale, zero


def _same_factors(g: _Graph, q: onnx.NodeProto, dq: onnx.NodeProto) -> bool:
    (qs, qz), (ds, dz) = _qparams(g, q), _qparams(g, dq)
    if qs is None or ds is None or qs.shape != ds.shape or not np.array_equal(qs, ds):
        return False
    qz = np.zeros_like(qs, dtype=np.int64) if qz is None else qz.astype(np.int64)
    dz = np.zeros_like(ds, dtype=np.int64) if dz is None else dz.astype(np.int64)
    return qz.shape == dz.shape and np.array_equal(qz, dz)


def _weight_violation(g: _Graph, node: onnx.NodeProto) -> str | None:
    """The rule a quantized layer's weight breaks, or None."""
    w_dq = g.producer.get(node.input[1]) if len(node.input) > 1 else None
    if w_dq is None or w_dq.op_type != "DequantizeLinear" or g.const(w_dq.input[0]) is None:
        return "its weight (input 1) must be a constant int8 tensor behind DequantizeLinear"
    q = g.const(w_dq.input[0])
    if g.types.get(w_dq.input[0]) != TensorProto.INT8:
        dtype = TensorProto.DataType.Name(g.types.get(w_dq.input[0], 0))
        return f"its weight {w_dq.input[0]!r} is {dtype}; AMCT adapts int8 weights only"
    scale, _ = _qparams(g, w_dq)
    if scale is None:
        return f"the scale of its weight DequantizeLinear {w_dq.name!r} is not a constant"
    per_tensor = scale.size == 1
    if node.op_type in ("Gemm", "MatMul") and not per_tensor:
        return (
            f"its weight is quantized per channel ({scale.size} scales in {w_dq.name!r}); AMCT adapts "
            f"{node.op_type} with per-tensor weights only"
        )
    if node.op_type == "MatMul" and q.ndim != 2:
        return f"its weight is {q.ndim}-D; AMCT adapts MatMul with 2-D constant weights only"
    if node.op_type == "Gemm" and _attr(node, "transA", 0):
        return "transA = 1; AMCT adapts Gemm with transA = 0 only"
    if node.op_type in ("Conv", "ConvTranspose") and not per_tensor:
        channel_axis = 0 if node.op_type == "Conv" else 1
        axis = _attr(w_dq, "axis", 1)
        if axis != channel_axis or scale.size != q.shape[channel_axis]:
            return (
                f"its weight scales ({scale.size}, axis {axis}) are neither per tensor nor per output "
                f"channel (axis {channel_axis}, {q.shape[channel_axis]} channels)"
            )
    if node.op_type == "ConvTranspose":
        if q.ndim != 4:
            return f"its filter is {q.ndim}-D; AMCT adapts ConvTranspose with 4-D filters only"
        if any(d != 1 for d in _attr(node, "dilations", [1])):
            return "dilations are not 1; AMCT adapts ConvTranspose with dilation 1 only"
    return None


def amct_violations(model: onnx.ModelProto) -> list[str]:
    """Every documented AMCT QAT constraint the graph breaks, one line per offending node."""
    g = _Graph(model)
    out: list[str] = []
    for node in model.graph.node:
        if node.op_type in INTEGER_OPS:
            out.append(
                f"{_label(node)}: integer-operator quantization (dynamic int8 or QLinear ops) cannot be "
                "adapted; AMCT takes QuantizeLinear/DequantizeLinear QAT models (use quant_mode static)"
            )
        elif node.op_type == "QuantizeLinear":
            out += _check_quantize(g, node)
        elif node.op_type == "DequantizeLinear" and g.const(node.input[0]) is not None:
            for user in g.consumers.get(node.output[0], []):
                k = list(user.input).index(node.output[0])
                weight_input = user.op_type in WEIGHT_OPS and k == 1
                bias_input = user.op_type in ("Conv", "Gemm", "ConvTranspose") and k == 2
                if not (weight_input or bias_input):
                    out.append(
                        f"{_label(user)}: reads the constant DequantizeLinear {node.name!r} at input {k}; "
                        "AMCT quantizes only the weights of Conv, ConvTranspose, Gemm and MatMul"
                    )
        elif node.op_type in WEIGHT_OPS:
            w_dq = g.producer.get(node.input[1]) if len(node.input) > 1 else None
            weight_q = w_dq is not None and w_dq.op_type == "DequantizeLinear"
            if not _quantized_input(g, node, 0):
                if weight_q and g.const(w_dq.input[0]) is not None:
                    out.append(
                        f"{_label(node)}: its weight is quantized but its input is not; AMCT adapts layers "
                        "whose input and weight are both quantized (QuantizeLinear/DequantizeLinear on both)"
                    )
                continue
            why = _weight_violation(g, node)
            if why:
                out.append(f"{_label(node)}: {why}")
    return out


def _quantized_input(g: _Graph, node: onnx.NodeProto, k: int) -> bool:
    if len(node.input) <= k:
        return False
    p = g.producer.get(node.input[k])
    return p is not None and p.op_type == "DequantizeLinear"


def _check_quantize(g: _Graph, q: onnx.NodeProto) -> list[str]:
    out = []
    x_type = g.types.get(q.input[0])
    if x_type != TensorProto.FLOAT:
        name = TensorProto.DataType.Name(x_type) if x_type else "of unknown type"
        out.append(f"{_label(q)}: quantizes {q.input[0]!r}, which is {name}; AMCT takes float32 inputs only")
    scale, _ = _qparams(g, q)
    if scale is None:
        return [*out, f"{_label(q)}: its scale is not a constant"]
    if scale.size != 1:
        out.append(
            f"{_label(q)}: quantizes an activation per channel ({scale.size} scales); AMCT supports "
            "per-channel quantization for weights only"
        )
    users = g.consumers.get(q.output[0], [])
    if not users and q.output[0] in g.outputs:
        return out  # a single-output QuantizeLinear at the model's output: AMCT makes it AscendQuant
    for dq in users:
        if dq.op_type != "DequantizeLinear":
            out.append(
                f"{_label(q)}: feeds {_label(dq)}; each QuantizeLinear must pair with a DequantizeLinear"
            )
            continue
        if not _same_factors(g, q, dq):
            out.append(
                f"{_label(dq)}: its scale / zero point differ from those of its QuantizeLinear {q.name!r}; "
                "a QuantizeLinear/DequantizeLinear pair must have the same quantization factors"
            )
        for user in g.consumers.get(dq.output[0], []):
            if user.op_type not in ADAPTABLE:
                out.append(
                    f"{_label(user)}: consumes the quantized activation {dq.output[0]!r}; AMCT adapts only "
                    f"{', '.join(ADAPTABLE)}"
                )
            elif user.op_type == "MatMul" and list(user.input).index(dq.output[0]) != 0:
                out.append(
                    f"{_label(user)}: a quantized activation at input 1; AMCT adapts single-input MatMul "
                    "(the second input a 2-D constant weight) only"
                )
    return out


def check_amct_qat_graph(model: onnx.ModelProto | Path, where: str = "") -> None:
    """Raise BackendError naming the first offending nodes when the graph breaks an AMCT QAT rule.

    Args:
        model: the ONNX model (or its file) that is about to be given to ``convert_qat_model``.
        where: what the model is (e.g. its path), to start the message with.
    """
    if not isinstance(model, onnx.ModelProto):
        where = where or str(model)
        model = onnx.load(str(model))
    problems = amct_violations(model)
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        prefix = f"{where}: " if where else ""
        raise BackendError(f"{prefix}not adaptable by AMCT: {'; '.join(problems[:3])}{more}")


# -- the artifact meant for AMCT ------------------------------------------------------------------
def qdq_for_amct(
    model,
    example_inputs,
    int8_layers,
    out_path: Path,
    calibration: np.ndarray | None,
    io=None,
) -> dict:
    """Write the project's QDQ int8 ONNX (the trained integers and scales, as for onnxruntime) for the
    8-bit layers of ``model`` to ``out_path``, then check it against AMCT's rules.

    The QDQ graph is made by the onnxruntime backend's own lowering, with the full 8-bit grid (no
    reduced range: that is a workaround for CPUs without VNNI, not Ascend's). Gemm / MatMul weights are
    per tensor when the QAT fine-tune used per-tensor grids for Linear layers, which the space does on
    ascend (``AscendBackend.weight_granularity``); anything else is refused here by the graph check.

    Returns:
        the onnxruntime artifact's meta (the kernels ORT would run for the QDQ graph on the CPU).

    Raises:
        BackendError: naming the offending node when the graph breaks an AMCT QAT constraint.
    """

    from .onnxruntime import OnnxRuntimeBackend

    int8_layers = LoweringSpec.coerce(int8_layers)  # a LoweringSpec, or {layer: 8}
    bad = {k: b for k, b in int8_layers.layer_bits().items() if b != 8}
    if bad:
        raise BackendError(f"only 8-bit layers are lowered through AMCT; got {bad}")
    ort = OnnxRuntimeBackend("cpu", isolate=False)
    ort.reduce_range = False  # Ascend's int8 Cube computes the full 8-bit grid
    ort.int8_connectors = False  # AMCT adapts Q/DQ pairs of Conv / Gemm / MatMul, not around Relu or pooling
    try:
        with scratch_dir("ac-qdq-") as tmp:
            art = ort.lower(model, example_inputs, int8_layers, Path(tmp), calibration=calibration, io=io)
            qdq = onnx.load(str(art.path))
            rewired = float_consumers_read_float(qdq) + unshare_constant_dequantize(qdq)
            check_amct_qat_graph(qdq, where=f"{out_path.name} (QDQ int8 for AMCT)")
            out_path.parent.mkdir(parents=True, exist_ok=True)
            onnx.save(qdq, str(out_path))
    finally:
        ort.close()
    return {**art.meta, "rewired_to_float": rewired}


def unshare_constant_dequantize(model: onnx.ModelProto) -> int:
    """Replace each ``Identity`` of a constant DequantizeLinear by a DequantizeLinear of its own.

    The exporter shares equal constants (e.g. equal conv biases) through Identity nodes; ORT's quantizer
    then quantizes the shared bias once, and the other layers read it through the Identity. AMCT expects
    every quantized weight or bias to come straight from a DequantizeLinear of a constant: each Identity
    becomes one, reading the same integers, scale and zero point (same values, so the same float tensor).
    Returns the number of Identity nodes replaced.
    """
    g = _Graph(model)
    n = 0
    for i, node in enumerate(model.graph.node):
        src = g.producer.get(node.input[0]) if node.op_type == "Identity" and node.input else None
        if src is None or src.op_type != "DequantizeLinear" or g.const(src.input[0]) is None:
            continue
        dq = onnx.NodeProto()
        dq.CopyFrom(src)
        dq.name = f"{node.name or node.output[0]}_DequantizeLinear"
        del dq.output[:]
        dq.output.append(node.output[0])
        model.graph.node[i].CopyFrom(dq)
        n += 1
    return n


def float_consumers_read_float(model: onnx.ModelProto) -> int:
    """Let operators AMCT does not adapt read the float tensor, not its QuantizeLinear/DequantizeLinear.

    ORT's quantizer puts one Q/DQ pair on a tensor and every consumer reads the DQ output, e.g. the
    ``Shape`` nodes of an attention block read the same LayerNorm output as its Linear layers. AMCT
    adapts Q/DQ only in front of Conv, ConvTranspose, Gemm, MatMul and Add; the other consumers get the
    tensor that the torch model gives them (weights are fake-quantized there, activations are not), and
    Q/DQ pairs nothing reads any more are removed (e.g. on a Conv output that only a Relu reads).
    Returns the number of inputs rewired.
    """
    g = _Graph(model)
    n = 0
    for dq in [d for d in model.graph.node if d.op_type == "DequantizeLinear"]:
        q = g.producer.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear":
            continue
        for user in g.consumers.get(dq.output[0], []):
            if user.op_type in ADAPTABLE:
                continue
            for k, name in enumerate(user.input):
                if name == dq.output[0]:
                    user.input[k] = q.input[0]
                    n += 1
    _drop_dead_qdq(model)
    return n


def _drop_dead_qdq(model: onnx.ModelProto) -> None:
    """Remove QuantizeLinear / DequantizeLinear nodes whose outputs nothing reads any more."""
    outputs = {o.name for o in model.graph.output}
    while True:
        read = {i for n in model.graph.node for i in n.input} | outputs
        dead = [
            n
            for n in model.graph.node
            if n.op_type in ("QuantizeLinear", "DequantizeLinear") and not any(o in read for o in n.output)
        ]
        if not dead:
            return
        for n in dead:
            model.graph.node.remove(n)
