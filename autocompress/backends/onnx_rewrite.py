"""ONNX graph rewriting for quantized artifacts: where a layer's weight lives in an exported graph, and
the surgery that makes the artifact hold exactly the integers the fine-tune trained.

- :func:`locate`: the initializer of a torch layer's weight (by name, else by value: the exporter may
  rename and transpose it) and the nodes that read it;
- :func:`write_trained_integers` / :func:`write_dynamic_integers`: QDQ write-back over the integers,
  scales and zero points ORT's quantizers computed (int32 biases re-quantized with
  ``input_scale * weight_scale``);
- :func:`weight_only_dq`: packed INT4 (two per byte, opset 21) or int8 weights behind a weight-only
  DequantizeLinear; :func:`half_weight`: float16 weights behind a Cast;
- embedding tables (found by :func:`locate` with ``lookup``) are rewritten by :mod:`.onnx_lookup`;
- :func:`restore_gemms`: the Gemms ``quantize_dynamic`` rewrote as MatMul + Add without quantizing them;
- :func:`lstm_nodes`: the ONNX LSTM nodes of a torch LSTM.

Pure functions over ``onnx`` protos (no runtime session): shareable by every backend that writes ONNX.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from ..errors import BackendError

QUANT_OPS = ("Conv", "Gemm", "MatMul")


def lstm_nodes(graph: onnx.GraphProto, module: torch.nn.LSTM) -> list[str]:
    """Names of the ONNX LSTM nodes exported from ``module`` (one per stacked layer), found by value:
    ONNX stores the gates as (i, o, f, c) where torch has (i, f, g, o)."""
    inits = {i.name: i for i in graph.initializer}
    refs = []
    for k in range(module.num_layers):
        i, f, g, o = getattr(module, f"weight_ih_l{k}").detach().numpy().reshape(4, module.hidden_size, -1)
        refs.append(np.concatenate([i, o, f, g]))
    found = []
    for node in graph.node:
        if node.op_type != "LSTM" or node.input[1] not in inits:
            continue
        w = numpy_helper.to_array(inits[node.input[1]])[0]
        if any(w.shape == r.shape and np.allclose(w, r) for r in refs):
            found.append(node.name)
    return found


def _consumers(graph: onnx.GraphProto, tensor: str) -> list[onnx.NodeProto]:
    return [n for n in graph.node if tensor in n.input]


def _producer(graph: onnx.GraphProto, tensor: str) -> onnx.NodeProto | None:
    return next((n for n in graph.node if tensor in n.output), None)


def container_bits(bits: int) -> int:
    """Bits each weight occupies in the artifact: INT4 for 2-4, int8 for 5-8, float16, float32."""
    return 4 if bits <= 4 else 8 if bits <= 8 else bits


def _int_tensor(name: str, q: np.ndarray, bits: int) -> TensorProto:
    if bits <= 4:  # INT4 container (2- and 3-bit grids fit in it): raw bytes, two values per byte
        return numpy_helper.from_array(q.astype(np.int8).astype(ml_dtypes.int4), name)
    return numpy_helper.from_array(q.astype(np.int8), name)


@dataclass
class LocatedWeight:
    """Where a torch layer's weight lives in the exported graph, and the integers it must hold.

    ``axis`` is the output-channel axis of the ONNX initializer: 0 when it keeps the torch layout
    (Conv, Gemm with transB=1), 1 when the exporter stored it transposed (MatMul). ``scale`` and
    ``zero`` have one entry per output channel, or are 0-d for a per-tensor grid.
    """

    layer: str
    init: str
    axis: int
    nodes: list[str]
    bits: int
    q: np.ndarray  # torch layout, on the layer's integer grid
    scale: np.ndarray
    zero: np.ndarray | None = None  # None: symmetric (zero point 0)
    mode: str = "static"
    lookup: bool = False  # an embedding table read by Gather nodes (``nodes``), not a matmul weight

    def q_onnx(self) -> np.ndarray:
        return self.q.T if self.axis == 1 else self.q

    def zero_point(self, dtype) -> np.ndarray:
        z = np.zeros(self.scale.shape, np.int32) if self.zero is None else self.zero
        return z.astype(dtype)


def locate(
    graph: onnx.GraphProto,
    layer: str,
    weight: np.ndarray,
    bits: int,
    q: np.ndarray,
    scale: np.ndarray,
    taken: set[str],
    zero: np.ndarray | None = None,
    mode: str = "static",
    lookup: bool = False,
) -> LocatedWeight:
    """Find the initializer holding ``weight`` (by name, else by value: the exporter may rename and
    transpose it, e.g. a bias-free Linear becomes MatMul with a folded transpose).

    ``lookup``: the weight is an embedding table, read as the data input of ``Gather`` nodes on axis 0
    (any other reader, e.g. a tied output projection, is refused: the table is stored for the lookups).
    """
    inits = {i.name: i for i in graph.initializer}
    name = f"{layer}.weight"
    candidates = [name] if name in inits else []
    candidates += [
        n for n, i in inits.items() if n != name and n not in taken and int(np.prod(i.dims)) == weight.size
    ]
    for cand in candidates:
        if lookup:
            users = [n for n in _consumers(graph, cand) if n.op_type == "Gather" and n.input[0] == cand]
        else:
            users = [n for n in _consumers(graph, cand) if n.op_type in QUANT_OPS and n.input[1] == cand]
        if not users:
            continue
        if lookup:
            table = numpy_helper.to_array(inits[cand])
            if table.shape != weight.shape or not np.array_equal(table, weight):
                continue
            _check_lookup(graph, layer, cand, users)
            return LocatedWeight(layer, cand, 0, [n.name for n in users], bits, q, scale, zero, mode, True)
        a = numpy_helper.to_array(inits[cand])
        if a.shape == weight.shape and np.array_equal(a, weight):
            axis = 0
        elif weight.ndim == 2 and a.shape == weight.T.shape and np.array_equal(a, weight.T):
            axis = 1
        else:
            continue
        return LocatedWeight(layer, cand, axis, [n.name for n in users], bits, q, scale, zero, mode)
    raise BackendError(
        f"cannot find the ONNX initializer of {name!r} (layer {layer!r}) in the exported graph"
    )


def _check_lookup(graph: onnx.GraphProto, layer: str, init: str, users: list) -> None:
    """The table is read by Gathers of rows (axis 0) alone."""
    for node in users:
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if axis != 0:
            raise BackendError(
                f"layer {layer!r}: Gather {node.name!r} reads the table on axis {axis}, not rows"
            )
    others = sorted({n.op_type for n in _consumers(graph, init) if n not in users})
    if others:
        raise BackendError(
            f"layer {layer!r}: its embedding table {init!r} is also read by {', '.join(others)} (tied "
            "weights?); only a table read by lookups alone is stored quantized: keep it at bits 32"
        )


def _set(inits: dict[str, TensorProto], name: str, array: np.ndarray) -> None:
    inits[name].CopyFrom(numpy_helper.from_array(array, name))


def write_trained_integers(
    qmodel: onnx.ModelProto, float_model: onnx.ModelProto, weights: list[LocatedWeight]
) -> None:
    """Replace ORT's weight integers/scales/zero points by the QAT ones; re-quantize the int32 biases."""
    g = qmodel.graph
    inits = {i.name: i for i in g.initializer}
    float_inits = {i.name: i for i in float_model.graph.initializer}
    for w in weights:
        for node in g.node:
            if node.op_type not in QUANT_OPS or len(node.input) < 2:
                continue
            w_dq = _producer(g, node.input[1])
            if w_dq is None or w_dq.op_type != "DequantizeLinear" or w_dq.input[0] != f"{w.init}_quantized":
                continue
            b_dq = _producer(g, node.input[2]) if len(node.input) > 2 and node.input[2] else None
            x_dq = _producer(g, node.input[0])
            has_bias = b_dq is not None and b_dq.op_type == "DequantizeLinear" and x_dq is not None
            q, scale = w.q_onnx(), w.scale
            if has_bias:
                x_scale = float(numpy_helper.to_array(inits[x_dq.input[1]]))
                bias = numpy_helper.to_array(float_inits[b_dq.input[0].removesuffix("_quantized")])
                if w.zero is None:
                    q, scale = _fit_bias(q, scale, bias, x_scale)
            _set(inits, w_dq.input[0], q.astype(np.int8))
            _set(inits, w_dq.input[1], scale)
            _set(inits, w_dq.input[2], w.zero_point(np.int8))
            if w.scale.ndim == 0:  # per tensor: no axis
                kept = [a for a in w_dq.attribute if a.name != "axis"]
                del w_dq.attribute[:]
                w_dq.attribute.extend(kept)
            if not has_bias:
                continue
            b_scale = np.broadcast_to(x_scale * scale, bias.shape).astype(np.float32)
            _set(inits, b_dq.input[0], int32_grid(bias, b_scale))
            _set(inits, b_dq.input[1], b_scale)
            if len(b_dq.input) > 2 and b_dq.input[2]:
                _set(inits, b_dq.input[2], np.zeros(bias.shape, np.int32))


INT32_MAX = 2**31 - 1


def _fit_bias(q: np.ndarray, scale: np.ndarray, bias: np.ndarray, x_scale: float):
    """The weight integers and scale at which ``bias`` fits int32 at ``x_scale * scale`` (the scale
    ``QLinearConv`` reads it at): unchanged unless the input was calibrated to (almost) a constant 0,
    where the output channel's weight scale widens (and its integers shrink) until the bias fits."""
    need = np.abs(bias).astype(np.float64) / (INT32_MAX * max(x_scale, 1e-45)) * (1 + 1e-6)
    if scale.ndim == 0:
        need = need.max(initial=0.0)
    wider = np.maximum(scale.astype(np.float64), need)
    if np.all(wider == scale):
        return q, scale
    ratio = (scale / wider).reshape((-1,) + (1,) * (q.ndim - 1)) if scale.ndim else scale / wider
    return np.round(q * ratio), wider.astype(np.float32)


def int32_grid(values: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``values / scale`` rounded to int32 (in float64: float32 cannot hold the int32 limits), saturated."""
    ratio = np.asarray(values, np.float64) / np.asarray(scale, np.float64)
    return np.clip(np.round(ratio), -INT32_MAX - 1, INT32_MAX).astype(np.int32)


def write_dynamic_integers(qmodel: onnx.ModelProto, weights: list[LocatedWeight]) -> None:
    """Replace quantize_dynamic's weight integers/scales/zero points (MatMulInteger) by the QAT ones."""
    g = qmodel.graph
    inits = {i.name: i for i in g.initializer}
    for w in weights:
        targets = {f"{w.init}_quantized", f"{w.init}_Transposed_quantized"}
        node = next((n for n in g.node if n.op_type == "MatMulInteger" and n.input[1] in targets), None)
        if node is None:
            raise BackendError(f"quantize_dynamic did not quantize layer {w.layer!r} (no MatMulInteger)")
        scale = f"{node.input[1].removesuffix('_quantized')}_scale"
        if scale not in inits or len(node.input) < 4:
            raise BackendError(f"quantize_dynamic left no weight scale/zero point for layer {w.layer!r}")
        _set(inits, node.input[1], w.q.T.astype(np.int8))  # MatMul weights are [in, out]
        _set(inits, node.input[3], w.zero_point(np.int8))
        _set(inits, scale, w.scale)


def restore_gemms(qmodel: onnx.ModelProto, float_model: onnx.ModelProto, keep: set[str]) -> None:
    """quantize_dynamic rewrites every Gemm as MatMul + Add; put back the Gemms it did not quantize
    (``keep``: the quantized ones), so static and float layers keep their own lowering."""
    g = qmodel.graph
    gemms = {n.name: n for n in float_model.graph.node if n.op_type == "Gemm" and n.name not in keep}
    nodes, used = [], set()
    for n in g.node:
        orig = next((gemms[k] for k in gemms if n.name in (f"{k}_MatMul", f"{k}_Add")), None)
        if orig is None:
            nodes.append(n)
        elif n.name == f"{orig.name}_MatMul" and n.op_type == "MatMul":
            nodes.append(orig)
            used.update(orig.input)
        # the _Add half is folded back into the Gemm
    del g.node[:]
    g.node.extend(nodes)
    float_inits = {i.name: i for i in float_model.graph.initializer}
    have = {i.name for i in g.initializer}
    g.initializer.extend(float_inits[k] for k in used if k in float_inits and k not in have)
    inputs = {i for n in g.node for i in n.input}
    drop_initializers(g, {i.name for i in g.initializer if i.name not in inputs and "_Transposed" in i.name})


def drop_initializers(graph: onnx.GraphProto, names: set[str]) -> None:
    """Delete the initializers named ``names`` in place.

    In place, by index: emptying the field and extending it with the kept tensors copies every weight
    (the whole model, once per call; on a 110M-parameter encoder, one call per layer grew the process
    to 17 GB)."""
    for i in reversed([k for k, t in enumerate(graph.initializer) if t.name in names]):
        del graph.initializer[i]


def _replace_initializer(
    graph: onnx.GraphProto, name: str, new: list[TensorProto], node: onnx.NodeProto
) -> None:
    """Swap initializer ``name`` for ``new`` tensors and a ``node`` that outputs ``name`` from them."""
    drop_initializers(graph, {name})
    graph.initializer.extend(new)
    graph.node.insert(0, node)


def half_weight(graph: onnx.GraphProto, w: LocatedWeight) -> None:
    """Store the weight as float16 (half the bytes) and Cast it to float for ORT's CPU kernels."""
    h_name = f"{w.init}_fp16"
    half = numpy_helper.from_array(w.q_onnx().astype(np.float16), h_name)
    cast = helper.make_node("Cast", [h_name], [w.init], to=TensorProto.FLOAT, name=f"{w.init}_Cast")
    _replace_initializer(graph, w.init, [half], cast)


def weight_only_dq(graph: onnx.GraphProto, w: LocatedWeight) -> None:
    """Replace the float initializer by packed integers + scales (+ zero points) + DequantizeLinear.

    The consumers keep reading the tensor of the same name; it is now the DQ node's output.
    """
    q_name, s_name = f"{w.init}_int{w.bits}", f"{w.init}_int{w.bits}_scale"
    new = [_int_tensor(q_name, w.q_onnx(), w.bits), numpy_helper.from_array(w.scale, s_name)]
    inputs = [q_name, s_name]
    if w.zero is not None:
        z_name = f"{w.init}_int{w.bits}_zero_point"
        new.append(_int_tensor(z_name, w.zero, w.bits))
        inputs.append(z_name)
    axis = {"axis": w.axis} if w.scale.ndim else {}
    dq = helper.make_node("DequantizeLinear", inputs, [w.init], name=f"{w.init}_DequantizeLinear", **axis)
    _replace_initializer(graph, w.init, new, dq)
