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

Ops outside this list (Mul, Sigmoid, Softmax, LayerNorm, ...) stay float: the region stops there, as
it stops at a layer the plan keeps float, at 2-4-bit or 16-bit layers (computed in float) and at
dynamically quantized ones.
"""

from __future__ import annotations

from collections.abc import Iterable

import onnx

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
