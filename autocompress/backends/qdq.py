"""Where activations stay int8 in a QDQ artifact: the ops between int8 layers that ORT runs in int8.

ONNX Runtime's ``quantize_static`` quantizes only the nodes it is given (``nodes_to_quantize``). Given
the int8 layers alone (Conv / Gemm / MatMul), it leaves every Relu, pooling, residual Add and Concat
between them in float, so the artifact holds ``DequantizeLinear -> Relu -> QuantizeLinear`` round trips
and float pooling that ORT's optimizer cannot remove (the quickstart model kept 5 QuantizeLinear + 5
DequantizeLinear where ORT's own all-ops artifact keeps 1 + 1). :func:`int8_region` adds the
connecting nodes whose inputs are all int8, so that ``quantize_static`` also handles them:

- Relu / Clip after a quantized tensor are *removed* (with asymmetric uint8 activations, the
  quantizer moves the activation's range onto the upstream output: the QuantizeLinear clamps at the
  zero point, which is the Relu);
- MaxPool and the shape ops (Flatten, Reshape, Transpose, Squeeze, Unsqueeze) keep the input's scale
  and ORT drops their Q/DQ pair (they run on the int8 tensor);
- AveragePool / GlobalAveragePool, Add and Concat get Q/DQ on inputs and output, which ORT's optimizer
  fuses into QLinearAveragePool / QLinearGlobalAveragePool, QLinearAdd and QLinearConcat. An Add or
  Concat with a constant operand (the bias Add after a MatMul) stays float: ``quantize_static`` would
  put the constant on the uint8 activation grid.

A mean over every spatial axis (``x.mean(dim=2)`` or ``x.mean((2, 3))`` in the model's code: an ONNX
ReduceMean) is global average pooling: :func:`pool_means` rewrites it as GlobalAveragePool (+ Flatten
where the mean drops the axes) when its input is int8, so it runs as QLinearGlobalAveragePool instead
of a DequantizeLinear -> ReduceMean -> QuantizeLinear round trip.

A Gemm whose output is a graph output (the classifier) keeps no QuantizeLinear -> DequantizeLinear
pair on it: :func:`float_gemm_outputs` removes it, ORT then runs a QGemm with float output, one
kernel less and the logits unrounded.

Ops outside this list (Mul, Sigmoid, Softmax, LayerNorm, ...) stay float: the region stops there, as
it stops at a layer the plan keeps float, at 2-4-bit or 16-bit layers (computed in float) and at
dynamically quantized ones.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import numpy as np
import onnx
from onnx import helper, numpy_helper

# op type -> the int8 kernel ORT's CPU provider runs for it once its QDQ pattern is in place
INT8_CONNECTORS = {
    "Relu": "removed (folded into the QuantizeLinear)",
    "Clip": "removed (folded into the QuantizeLinear)",
    "MaxPool": "MaxPool on int8 (Q/DQ dropped)",
    "AveragePool": "QLinearAveragePool",
    "GlobalAveragePool": "QLinearGlobalAveragePool",
    "Add": "QLinearAdd",
    "Concat": "QLinearConcat",
    "Flatten": "int8 (Q/DQ dropped)",
    "Reshape": "int8 (Q/DQ dropped)",
    "Transpose": "int8 (Q/DQ dropped)",
    "Squeeze": "int8 (Q/DQ dropped)",
    "Unsqueeze": "int8 (Q/DQ dropped)",
}

# ops whose inputs are all activations of the same kind: with a constant operand (a MatMul's bias
# Add) they stay float, as a uint8 activation grid would round the constant
ALL_INPUTS_INT8 = ("Add", "Concat")


def _constants(graph: onnx.GraphProto) -> set[str]:
    """Tensors that are not activations: initializers and Constant outputs."""
    out = {i.name for i in graph.initializer}
    out.update(o for n in graph.node if n.op_type == "Constant" for o in n.output)
    return out


def int8_region(graph: onnx.GraphProto, layers: Iterable[str]) -> list[str]:
    """The int8 layer nodes ``layers`` plus every connector node (see :data:`INT8_CONNECTORS`) whose
    activation inputs all come from the region, found by walking the graph forward in topological
    order (an exported graph is sorted).

    Returns the names in graph order, for ``quantize_static(nodes_to_quantize=...)``.
    """
    region = set(layers)
    constants = _constants(graph)
    int8_tensors: set[str] = set()
    for node in graph.node:
        if node.name not in region:
            acts = [t for t in node.input if t and t not in constants]
            # a computed shape (Reshape) or bound (Clip) counts as an activation input: never int8
            if not node.name or node.op_type not in INT8_CONNECTORS:
                continue
            if not acts or not all(t in int8_tensors for t in acts):
                continue
            if node.op_type in ALL_INPUTS_INT8 and len(acts) < len([t for t in node.input if t]):
                continue  # a MatMul's bias Add: its constant would be rounded onto the activation grid
            region.add(node.name)
        int8_tensors.update(node.output)
    return [n.name for n in graph.node if n.name in region]


def _mean_axes(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> list[int] | None:
    """A ReduceMean's axes: the attribute (opset < 18) or the constant second input; None if computed."""
    for a in node.attribute:
        if a.name == "axes":
            return list(a.ints)
    if len(node.input) > 1 and node.input[1]:
        init = inits.get(node.input[1])
        return None if init is None else [int(v) for v in np.atleast_1d(numpy_helper.to_array(init))]
    return []  # no axes: all of them (unless noop_with_empty_axes)


def pool_means(model: onnx.ModelProto, layers: Iterable[str]) -> int:
    """Rewrite in place every ReduceMean over all axes past the channel axis (``[N, C, ...] -> [N, C]``)
    whose input is in the int8 region of ``layers`` as GlobalAveragePool, followed by a Flatten when the
    mean drops the reduced axes (``keepdims=0``); the same values, exactly. Returns how many it rewrote.
    """
    graph = model.graph
    region = set(int8_region(graph, layers))
    int8_tensors = {t for n in graph.node if n.name in region for t in n.output}
    ranks = {
        v.name: len(v.type.tensor_type.shape.dim)
        for v in (*onnx.shape_inference.infer_shapes(model).graph.value_info, *graph.input)
        if v.type.tensor_type.HasField("shape")
    }
    inits = {i.name: i for i in graph.initializer}
    rewritten = 0
    for node in list(graph.node):
        if node.op_type != "ReduceMean" or node.input[0] not in int8_tensors:
            continue
        rank, axes = ranks.get(node.input[0]), _mean_axes(node, inits)
        if rank is None or rank < 3 or axes is None:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if not axes and attrs.get("noop_with_empty_axes", 0):
            continue
        if sorted(a % rank for a in (axes or range(rank))) != list(range(2, rank)):
            continue
        keep = attrs.get("keepdims", 1)
        pooled = node.output[0] if keep else f"{node.output[0]}_pooled"
        nodes = [helper.make_node("GlobalAveragePool", [node.input[0]], [pooled], name=f"{node.name}_gap")]
        if not keep:
            nodes.append(
                helper.make_node("Flatten", [pooled], [node.output[0]], name=f"{node.name}_flat", axis=1)
            )
        position = list(graph.node).index(node)
        graph.node.remove(node)
        for k, new in enumerate(nodes):
            graph.node.insert(position + k, new)
        rewritten += 1
    return rewritten


def float_gemm_outputs(graph: onnx.GraphProto) -> int:
    """Drop the QuantizeLinear -> DequantizeLinear pair between a Gemm and a graph output (in place):
    ORT fuses ``DQ -> Gemm`` into a QGemm with float output, so the pair only costs a kernel and rounds
    the logits onto a uint8 grid. Returns how many pairs it removed."""
    producer = {o: n for n in graph.node for o in n.output}
    readers = Counter(t for n in graph.node for t in n.input)
    outputs = {o.name for o in graph.output}
    removed, dropped = 0, set()
    for dq in list(graph.node):
        if dq.op_type != "DequantizeLinear" or dq.output[0] not in outputs or readers[dq.output[0]]:
            continue
        q = producer.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear" or readers[q.output[0]] != 1:
            continue
        gemm = producer.get(q.input[0])
        if gemm is None or gemm.op_type != "Gemm" or q.input[0] in outputs or readers[q.input[0]] != 1:
            continue  # not a Gemm, or its output is read elsewhere too
        gemm.output[0] = dq.output[0]
        graph.node.remove(q)
        graph.node.remove(dq)
        dropped.update([*q.input[1:], *dq.input[1:]])
        removed += 1
    read = {t for n in graph.node for t in n.input}
    for init in [i for i in graph.initializer if i.name in dropped and i.name not in read]:
        graph.initializer.remove(init)  # the pairs' scales and zero points, unless read elsewhere
    return removed
