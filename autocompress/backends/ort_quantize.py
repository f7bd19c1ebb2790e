"""ONNX Runtime's quantizers driven by a lowering spec: dynamic int8, static QDQ int8, INT4, float16.

:func:`quantize_graph` lowers an exported float graph, layer by layer as the
:class:`~autocompress.lowering.LoweringSpec` says:

1. ``dynamic`` int8 layers (Linear, LSTM): ORT's ``quantize_dynamic`` restricted to their nodes; the
   Gemms it rewrites as MatMul + Add without quantizing them are restored. A dynamic layer whose input,
   measured on the calibration data and quantized per tensor as ORT does at run time, keeps a
   channel-averaged SQNR below :data:`.dynamic_outliers.OUTLIER_SQNR_DB` (a few outlier values set the
   input's range) is kept float (:mod:`.dynamic_outliers`);
2. 5- to 8-bit ``static`` layers: ORT's ``quantize_static`` (QDQ, per-channel weights, activations
   calibrated by min-max or percentile), with the Relu / pooling / Add / Concat nodes between them
   (:func:`.qdq.int8_region`) when ``int8_connectors``, so ORT fuses them into int8 kernels; a
   spatial mean runs as int8 global pooling, a classifier Gemm gives float logits (:mod:`.qdq`);
3. the integers ORT computed are replaced by the ones the fine-tune trained (:mod:`.onnx_rewrite`),
   and the static convs' biases corrected for the mean shift int8 rounding adds (:mod:`.bias_correction`);
4. 2- to 4-bit layers: packed INT4 weight-only DequantizeLinear; 16-bit layers: float16 + Cast;
5. embedding tables (``nn.Embedding``, any bits below float): stored packed, weight-only, and
   dequantized after the lookup (:func:`.onnx_lookup.lookup_weight_only`).
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from ..errors import BackendError, ExportError
from ..lowering import LoweringSpec, symmetric_grid
from .bias_correction import SAMPLES, correct_biases
from .dynamic_outliers import OUTLIER_SQNR_DB, outlier_layers
from .onnx_export import INPUT, graph_input_names
from .onnx_lookup import lookup_block, lookup_weight_only
from .onnx_rewrite import (
    LocatedWeight,
    half_weight,
    locate,
    lstm_nodes,
    restore_gemms,
    weight_only_dq,
    write_dynamic_integers,
    write_trained_integers,
)
from .qdq import float_gemm_outputs, int8_region, pool_means

PERCENTILE = 99.99  # percentile calibration keeps the central 99.99% of each activation's values
CALIBRATION_METHODS = {"minmax": lambda m: m.MinMax, "percentile": lambda m: m.Percentile}
RECURRENT = (torch.nn.LSTM, torch.nn.GRU)


@contextlib.contextmanager
def _quiet():
    """Silence ORT's quantizer (it warns through the root logger and prints calibration stats)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


class _Calibration:
    """``CalibrationDataReader`` over sample inputs (one array per graph input), 32 samples per batch."""

    def __init__(self, data: tuple[np.ndarray, ...] | np.ndarray, names: list[str] | None = None):
        data = (data,) if isinstance(data, np.ndarray) else tuple(data)
        names = names or [INPUT]
        n = len(data[0])
        self._batches = iter(
            [
                {k: np.ascontiguousarray(a[i : i + 32]) for k, a in zip(names, data, strict=True)}
                for i in range(0, n, 32)
            ]
        )

    def get_next(self):
        return next(self._batches, None)

    def rewind(self):  # pragma: no cover - not used by MinMax
        pass


def _feeds(data, names: list[str]) -> list[dict[str, np.ndarray]]:
    """The first :data:`.bias_correction.SAMPLES` calibration samples as graph feeds, 16 a batch."""
    data = (data,) if isinstance(data, np.ndarray) else tuple(data)
    n = min(len(data[0]), SAMPLES)
    return [
        {k: np.ascontiguousarray(a[i : min(i + 16, n)]) for k, a in zip(names, data, strict=True)}
        for i in range(0, n, 16)
    ]


def _located(graph, model, spec: LoweringSpec, reduce_range: bool) -> tuple[list[LocatedWeight], list[str]]:
    """The graph place and integers of every quantized layer; the LSTM layers (quantized by ORT alone)."""
    modules = dict(model.named_modules())
    located: list[LocatedWeight] = []
    recurrent: list[str] = []
    for layer, bits in spec.quantized().items():
        module, lay = modules[layer], spec.layer(layer)
        if isinstance(module, RECURRENT):
            if isinstance(module, torch.nn.GRU):
                raise BackendError(
                    f"onnxruntime backend: layer {layer!r}: dynamic quantization of GRU is not supported "
                    "(ORT's quantize_dynamic quantizes MatMul/Gemm and LSTM only); keep it at bits 32"
                )
            recurrent.append(layer)
            continue
        weight = module.weight.detach()
        lookup = isinstance(module, torch.nn.Embedding)  # weight-only; a lookup accumulates nothing
        zero = None
        if bits == 16:
            q, scale = weight.half().numpy(), np.ones(weight.shape[0], np.float32)
        else:  # the fine-tune's integers; else (not from compress()) the symmetric per-channel grid
            record = lay.weight if lay.weight is not None and lay.weight.bits == bits else None
            record = record or symmetric_grid(weight, bits, reduce_range and not lookup)
            q, scale = record.q, record.scale.astype(np.float32)
            zero = record.zero_point if record.scheme == "asymmetric" else None
        taken = {w.init for w in located}
        mode = "static" if lookup else lay.mode
        located.append(locate(graph, layer, weight.numpy(), bits, q, scale, taken, zero, mode, lookup))
    return located, recurrent


def _int4_dequantize(model, layer: str, bits: int) -> bool:
    """Whether the layer's weight is stored as ONNX INT4 behind a DequantizeLinear (opset 21): 2-4 bits,
    except embedding tables that ``GatherBlockQuantized`` reads (any opset)."""
    if bits > 4:
        return False
    module = model.get_submodule(layer)
    return not (isinstance(module, torch.nn.Embedding) and lookup_block(module.embedding_dim))


def quantize_graph(
    model,
    fp32: Path,
    target: Path,
    spec: LoweringSpec,
    calibration,
    tmp: Path,
    *,
    reduce_range: bool,
    int8_connectors: bool = True,
    outlier_sqnr_db: float | None = OUTLIER_SQNR_DB,
) -> dict[str, float]:
    """Write to ``target`` the quantized form of the float graph ``fp32`` exported from ``model``.

    Returns:
        the dynamic int8 layers kept float because their input's channel-averaged SQNR under run-time
        quantization is below ``outlier_sqnr_db`` (None: none is), with that SQNR in dB.
    """
    float_model = onnx.load(str(fp32))
    if any(_int4_dequantize(model, layer, b) for layer, b in spec.quantized().items()):
        float_model = onnx.version_converter.convert_version(float_model, 21)  # INT4 needs opset 21
        onnx.save(float_model, str(fp32))
    located, recurrent = _located(float_model.graph, model, spec, reduce_range)
    modules = dict(model.named_modules())
    qmodel, current = float_model, fp32
    dynamic = [w for w in located if w.mode == "dynamic" and not w.lookup]
    kept: dict[str, float] = {}
    if dynamic and outlier_sqnr_db is not None:
        feeds = _feeds(calibration, graph_input_names(fp32))
        kept = outlier_layers(fp32, {w.layer: w.nodes for w in dynamic}, feeds, outlier_sqnr_db)
        dynamic = [w for w in dynamic if w.layer not in kept]
    if dynamic or recurrent:
        nodes = [n for w in dynamic for n in w.nodes]
        for layer in recurrent:
            found = lstm_nodes(float_model.graph, modules[layer])
            if not found:
                raise BackendError(f"cannot find the ONNX LSTM node of layer {layer!r} in the exported graph")
            nodes += found
        qmodel = quantize_dynamic_nodes(current, tmp / "dynamic.onnx", nodes, reduce_range)
        restore_gemms(qmodel, float_model, set(nodes))
        write_dynamic_integers(qmodel, dynamic)
        # both quantizers name a quantizer node '<tensor>_QuantizeLinear': a static int8 region whose
        # output also feeds a dynamic layer would get two nodes of one name, which ORT refuses to load
        for node in qmodel.graph.node:
            if node.op_type == "DynamicQuantizeLinear" and node.name:
                node.name = f"{node.name}_dynamic"
        current = tmp / "dynamic_restored.onnx"
        onnx.save(qmodel, str(current))
    eight = [w for w in located if 5 <= w.bits <= 8 and w.mode == "static" and not w.lookup]
    if eight:
        nodes = [n for w in eight for n in w.nodes]
        if int8_connectors:
            graph_model = onnx.load(str(current))
            if pool_means(graph_model, nodes):  # a spatial mean stays int8 as global average pooling
                current = tmp / "pooled.onnx"
                onnx.save(graph_model, str(current))
            nodes = int8_region(graph_model.graph, nodes)
        qmodel = quantize_static_nodes(current, tmp / "qdq.onnx", nodes, calibration, spec.calibration)
        write_trained_integers(qmodel, float_model, eight)
        if int8_connectors:
            float_gemm_outputs(qmodel.graph)
        if spec.bias_correction:
            reference = _unrounded(current, spec, eight, tmp)
            correct_biases(qmodel, reference, _feeds(calibration, graph_input_names(current)), nodes)
    for w in located:
        if w.lookup:
            lookup_weight_only(qmodel, w)
        elif w.bits <= 4:
            weight_only_dq(qmodel.graph, w)
        elif w.bits == 16:
            half_weight(qmodel.graph, w)
    onnx.save(qmodel, str(target))
    return kept


def _unrounded(current: Path, spec: LoweringSpec, eight: list[LocatedWeight], tmp: Path) -> Path:
    """The float graph bias correction compares against: ``current`` with the weights before rounding
    where the record keeps them (a post-training plan's student holds weights already on the int8 grid,
    and a reference with those would hide the shift their rounding adds)."""
    sources = {}
    for w in eight:
        record = spec.layer(w.layer).weight
        if record is not None and record.source is not None:
            sources[w.init] = record.source.T if w.axis == 1 else record.source
    if not sources:
        return current
    model = onnx.load(str(current))
    for init in model.graph.initializer:
        if init.name in sources:
            values = sources[init.name].astype(np.float32).reshape(tuple(init.dims))
            init.CopyFrom(numpy_helper.from_array(values, init.name))
    path = tmp / "unrounded.onnx"
    onnx.save(model, str(path))
    return path


def quantize_dynamic_nodes(fp32: Path, out: Path, nodes: list[str], reduce_range: bool):
    """ORT's quantize_dynamic on ``nodes`` only (Gemm nodes are quantized as ``<name>_MatMul``)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(str(fp32)).graph
    gemms = {n.name for n in graph.node if n.op_type == "Gemm"}
    targets = [f"{n}_MatMul" if n in gemms else n for n in nodes]
    with _quiet():
        try:
            quantize_dynamic(
                str(fp32),
                str(out),
                per_channel=True,
                reduce_range=reduce_range,
                weight_type=QuantType.QInt8,
                nodes_to_quantize=targets,
                op_types_to_quantize=["MatMul", "LSTM"],
                extra_options={"WeightSymmetric": True, "MatMulConstBOnly": True},
            )
        except Exception as exc:
            raise ExportError(f"onnxruntime quantize_dynamic failed: {type(exc).__name__}: {exc}") from exc
    return onnx.load(str(out))


def quantize_static_nodes(fp32: Path, out: Path, nodes: list[str], calibration, method: str = "minmax"):
    """ORT's quantize_static (QDQ, per-channel int8 weights, uint8 activations) on ``nodes`` only."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    extra = {"WeightSymmetric": True, "ActivationSymmetric": False}
    if method == "percentile":
        extra.update(CalibPercentile=PERCENTILE, CalibTensorRangeSymmetric=False)
    # ORT computes a scale for every calibrated tensor, also those it leaves float: a BERT attention
    # mask's range [-inf, 0] divides inf by inf there (a numpy warning, nothing written); a non-finite
    # scale that does reach the artifact is refused below
    with _quiet(), np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        try:
            quantize_static(
                str(fp32),
                str(out),
                _Calibration(calibration, graph_input_names(fp32)),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                nodes_to_quantize=nodes,
                calibrate_method=CALIBRATION_METHODS[method](CalibrationMethod),
                extra_options=extra,
            )
        except Exception as exc:
            raise ExportError(f"onnxruntime quantize_static failed: {type(exc).__name__}: {exc}") from exc
    qmodel = onnx.load(str(out))
    check_finite_scales(qmodel)
    return qmodel


def check_finite_scales(model: onnx.ModelProto) -> None:
    """Refuse a QDQ model whose Quantize/DequantizeLinear nodes read a scale that is not finite and
    positive (a calibrated range with an infinity, e.g. an additive attention mask quantized)."""
    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and node.input[1] in inits:
            scale = numpy_helper.to_array(inits[node.input[1]])
            if not np.all(np.isfinite(scale) & (scale > 0)):
                raise ExportError(
                    f"quantize_static: {node.op_type} {node.name or node.output[0]} of tensor "
                    f"{node.input[0]!r} has scale {scale.ravel()[:4].tolist()} (not finite and positive): "
                    "its calibrated range is not finite; keep the layer that reads it float"
                )
