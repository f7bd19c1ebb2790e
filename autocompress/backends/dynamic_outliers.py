"""Which dynamic int8 layers read an input that ORT's per-tensor activation quantization would destroy.

ORT's dynamic int8 (``DynamicQuantizeLinear`` + ``MatMulInteger``) quantizes a layer's input at run time
to uint8 with ONE scale for the whole tensor, set by its minimum and maximum. An input whose range is
set by a few huge values (a handful of hidden dimensions of a trained transformer's FFN can reach
50-100x the typical magnitude) then leaves the bulk of its values a few quantization steps: the
layer's output error is large however its weights are quantized.

:func:`channel_sqnr` measures that on calibration data: the float graph is run with each dynamic
layer's input added as an output, each input is quantized exactly as ``DynamicQuantizeLinear`` does
(range ``[min(x, 0), max(x, 0)]``, 255 steps, zero point rounded) per run-time batch, and the
signal-to-quantization-noise ratio is taken per input dimension and averaged over the dimensions:
``-10 log10(mean_j sum (x_j - dq(x_j))^2 / sum x_j^2)`` in dB. Averaged per dimension, not over the
whole tensor: a whole-tensor ratio counts the outliers' own power as signal and hides what the other
dimensions lost. Each dimension's ratio is at most about 1 (a value that rounds to 0 loses itself), so
a few near-silent dimensions cannot dominate the mean. A well-spread input gives 20-30 dB at 8 bits;
below :data:`OUTLIER_SQNR_DB` the typical dimension keeps an error over 30% of its magnitude, and the
lowering keeps the layer float (:func:`.ort_quantize.quantize_graph`).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

OUTLIER_SQNR_DB = 10.0  # a dynamic int8 layer whose input quantizes below this SQNR is kept float
MAX_FEEDS = 2  # run-time batches of calibration samples the SQNR is measured on


def dequantized_uint8(x: np.ndarray) -> np.ndarray:
    """``x`` quantized and dequantized as ``DynamicQuantizeLinear`` does (per tensor, uint8)."""
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    if hi == lo:
        return np.zeros_like(x)
    scale = (hi - lo) / 255.0
    zero = np.clip(np.round(-lo / scale), 0, 255)
    return (np.clip(np.round(x / scale) + zero, 0, 255) - zero) * scale


def _input_of(graph: onnx.GraphProto, names: list[str]) -> str | None:
    """The tensor the layer's first MatMul / Gemm node reads as its activation (input 0)."""
    by_name = {n.name: n for n in graph.node}
    for name in names:
        node = by_name.get(name)
        if node is not None and node.op_type in ("MatMul", "Gemm"):
            return node.input[0]
    return None


def channel_sqnr(
    fp32: Path, nodes: dict[str, list[str]], feeds: list[dict[str, np.ndarray]]
) -> dict[str, float]:
    """Layer -> channel-averaged SQNR (dB) of its input under per-tensor dynamic uint8 quantization.

    Args:
        fp32: the float graph.
        nodes: layer -> its MatMul / Gemm node names in that graph (a layer without one is left out).
        feeds: calibration batches as graph feeds (the first :data:`MAX_FEEDS` are used).
    """
    import onnxruntime as ort

    model = onnx.load(str(fp32))
    tensors = {layer: t for layer, names in nodes.items() if (t := _input_of(model.graph, names))}
    if not tensors or not feeds:
        return {}
    outputs = {o.name for o in model.graph.output}
    wanted = sorted(set(tensors.values()))
    for name in wanted:
        if name not in outputs:
            model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    signal: dict[str, np.ndarray] = {}
    noise: dict[str, np.ndarray] = {}
    for feed in feeds[:MAX_FEEDS]:
        values = dict(zip(wanted, session.run(wanted, feed), strict=True))
        for name in wanted:
            x = values.pop(name)
            x = x.reshape(-1, x.shape[-1])
            signal[name] = signal.get(name, 0.0) + np.square(x, dtype=np.float64).sum(0)
            noise[name] = noise.get(name, 0.0) + np.square(dequantized_uint8(x) - x, dtype=np.float64).sum(0)
    db = {}
    for name in wanted:
        live = signal[name] > 0  # an all-zero dimension quantizes exactly
        ratio = float((noise[name][live] / signal[name][live]).mean()) if live.any() else 0.0
        db[name] = math.inf if ratio == 0 else -10 * math.log10(ratio)
    return {layer: db[tensor] for layer, tensor in tensors.items()}


def outlier_layers(
    fp32: Path, nodes: dict[str, list[str]], feeds: list[dict[str, np.ndarray]], threshold_db: float
) -> dict[str, float]:
    """Layer -> channel-averaged input SQNR (dB, rounded) of the dynamic layers below ``threshold_db``."""
    return {k: round(v, 1) for k, v in channel_sqnr(fp32, nodes, feeds).items() if v < threshold_db}
