"""ONNX Runtime backend: QDQ int8 / INT4 / float16 artifacts with real int8 kernels on the CPU provider.

Device ``cpu`` (the default) runs the CPU execution provider; ``cuda:N`` runs the CUDA execution
provider on GPU N where this onnxruntime has it (the ``onnxruntime-gpu`` package), falling back to
the CPU provider for nodes CUDA does not implement, as ORT does.

Lowering, in order:
1. ``torch.onnx.export`` of the finalized model (BN already folded, weights already on their grid).
2. Layers whose plan says ``quant_mode: dynamic`` (int8 Linear, LSTM): ONNX Runtime's
   ``quantize_dynamic`` restricted to their nodes (DynamicQuantizeLinear + MatMulInteger,
   DynamicQuantizeLSTM); the Gemms it rewrites as MatMul + Add without quantizing them are restored.
3. ONNX Runtime's own ``quantize_static`` (QDQ format, per-channel weights, activations calibrated
   by min-max or by percentile on training samples) for the static layers whose plan says 5 to 8 bits,
   together with the Relu / pooling / residual Add / Concat / shape nodes between them
   (:func:`.qdq.int8_region`), so activations stay int8 from one int8 layer to the next as in ORT's
   own all-ops artifact. It lays out the Q/DQ pattern that ORT fuses into QLinearConv / QGemm /
   QLinearAdd / QLinearConcat / QLinearGlobalAveragePool.
4. The weight integers, scales and zero points it computed are replaced by the ones the QAT
   fine-tune trained on (``module.ac_weight_quant``: symmetric or asymmetric, per channel or per
   tensor, min-max or learned (LSQ) scales), and each int32 bias is re-quantized with
   ``input_scale * weight_scale``. The artifact then holds exactly the integers the torch model
   was fine-tuned with.
5. 2- to 4-bit layers: packed INT4 weights (two per byte, opset 21), INT4 zero points when
   asymmetric, behind a weight-only DequantizeLinear; 16-bit layers: float16 weights behind a Cast.
   ORT computes both in float.

Asymmetric int8 weights (non-zero zero points) fuse into QLinearConv / QGemm like symmetric ones; on
CPUs without VNNI both use a 7-bit grid (``reduce_range``), on which ORT's fused kernels give the same
outputs as the unfused QDQ graph (a full 8-bit grid saturates there).
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from ..errors import BackendError, ExportError, MissingDependencyError, RuntimeLoadError
from ..techniques.quantize import (
    CALIBRATION_ATTR,
    MODE_ATTR,
    QUANT_ATTR,
    RECURRENT,
    WeightQuant,
    qmax_for,
    quantize_weight,
)
from .base import (
    Artifact,
    Backend,
    LatencyStats,
    device_lock,
    parse_device,
    repeat_to_batch,
    time_callables,
)
from .device_facts import cpu_has_vnni, cpu_info, nvidia_smi_info  # noqa: F401 - cpu_has_vnni re-exported
from .onnx_export import INPUT, OUTPUT, default_io, export_onnx, graph_input_names  # noqa: F401 - re-exported
from .qdq import int8_region
from .worker import WorkerClient

QUANT_OPS = ("Conv", "Gemm", "MatMul")
PERCENTILE = 99.99  # percentile calibration keeps the central 99.99% of each activation's values
CALIBRATION_METHODS = {"minmax": lambda m: m.MinMax, "percentile": lambda m: m.Percentile}


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


def _lstm_nodes(graph: onnx.GraphProto, module: torch.nn.LSTM) -> list[str]:
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


def _ort():
    try:
        import onnxruntime
    except ImportError as exc:  # pragma: no cover - a core dependency
        raise MissingDependencyError("onnxruntime is not installed: pip install onnxruntime") from exc
    return onnxruntime


def providers_for(device: str) -> list:
    """The execution providers (with options) for ``cpu`` or ``cuda:N``."""
    if device == "cpu":
        return ["CPUExecutionProvider"]
    _, idx = parse_device(device)
    return [("CUDAExecutionProvider", {"device_id": idx}), "CPUExecutionProvider"]


def make_session(path: str | Path, threads: int, optimized_path: Path | None = None, device: str = "cpu"):
    """An ORT session with full graph optimizations and ``threads`` intra-op threads."""
    ort = _ort()
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    try:
        return ort.InferenceSession(str(path), so, providers=providers_for(device))
    except Exception as exc:
        raise RuntimeLoadError(f"onnxruntime could not load {path}: {str(exc).splitlines()[0]}") from exc


def _consumers(graph: onnx.GraphProto, tensor: str) -> list[onnx.NodeProto]:
    return [n for n in graph.node if tensor in n.input]


def _producer(graph: onnx.GraphProto, tensor: str) -> onnx.NodeProto | None:
    return next((n for n in graph.node if tensor in n.output), None)


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


def container_bits(bits: int) -> int:
    """Bits each weight occupies in the artifact: INT4 for 2-4, int8 for 5-8, float16, float32."""
    return 4 if bits <= 4 else 8 if bits <= 8 else bits


def _int_tensor(name: str, q: np.ndarray, bits: int) -> TensorProto:
    if bits <= 4:  # INT4 container (2- and 3-bit grids fit in it): raw bytes, two values per byte
        return numpy_helper.from_array(q.astype(np.int8).astype(ml_dtypes.int4), name)
    return numpy_helper.from_array(q.astype(np.int8), name)


@dataclass
class _Weight:
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

    def q_onnx(self) -> np.ndarray:
        return self.q.T if self.axis == 1 else self.q

    def zero_point(self, dtype) -> np.ndarray:
        z = np.zeros(self.scale.shape, np.int32) if self.zero is None else self.zero
        return z.astype(dtype)


def _locate(
    graph: onnx.GraphProto,
    layer: str,
    weight: np.ndarray,
    bits: int,
    q: np.ndarray,
    scale: np.ndarray,
    taken: set[str],
    zero: np.ndarray | None = None,
    mode: str = "static",
) -> _Weight:
    """Find the initializer holding ``weight`` (by name, else by value: the exporter may rename and
    transpose it, e.g. a bias-free Linear becomes MatMul with a folded transpose)."""
    inits = {i.name: i for i in graph.initializer}
    name = f"{layer}.weight"
    candidates = [name] if name in inits else []
    candidates += [
        n for n, i in inits.items() if n != name and n not in taken and int(np.prod(i.dims)) == weight.size
    ]
    for cand in candidates:
        users = [n for n in _consumers(graph, cand) if n.op_type in QUANT_OPS and n.input[1] == cand]
        if not users:
            continue
        a = numpy_helper.to_array(inits[cand])
        if a.shape == weight.shape and np.array_equal(a, weight):
            axis = 0
        elif weight.ndim == 2 and a.shape == weight.T.shape and np.array_equal(a, weight.T):
            axis = 1
        else:
            continue
        return _Weight(layer, cand, axis, [n.name for n in users], bits, q, scale, zero, mode)
    raise BackendError(
        f"cannot find the ONNX initializer of {name!r} (layer {layer!r}) in the exported graph"
    )


def _set(inits: dict[str, TensorProto], name: str, array: np.ndarray) -> None:
    inits[name].CopyFrom(numpy_helper.from_array(array, name))


def _write_trained_integers(
    qmodel: onnx.ModelProto, float_model: onnx.ModelProto, weights: list[_Weight]
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
            _set(inits, w_dq.input[0], w.q_onnx().astype(np.int8))
            _set(inits, w_dq.input[1], w.scale)
            _set(inits, w_dq.input[2], w.zero_point(np.int8))
            if w.scale.ndim == 0:  # per tensor: no axis
                kept = [a for a in w_dq.attribute if a.name != "axis"]
                del w_dq.attribute[:]
                w_dq.attribute.extend(kept)
            if len(node.input) < 3 or not node.input[2]:
                continue
            b_dq, x_dq = _producer(g, node.input[2]), _producer(g, node.input[0])
            if b_dq is None or b_dq.op_type != "DequantizeLinear" or x_dq is None:
                continue
            x_scale = float(numpy_helper.to_array(inits[x_dq.input[1]]))
            bias = numpy_helper.to_array(float_inits[b_dq.input[0].removesuffix("_quantized")])
            b_scale = np.broadcast_to(x_scale * w.scale, bias.shape).astype(np.float32)
            _set(inits, b_dq.input[0], np.round(bias / b_scale).astype(np.int32))
            _set(inits, b_dq.input[1], b_scale)
            if len(b_dq.input) > 2 and b_dq.input[2]:
                _set(inits, b_dq.input[2], np.zeros(bias.shape, np.int32))


def _write_dynamic_integers(qmodel: onnx.ModelProto, weights: list[_Weight]) -> None:
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


def _restore_gemms(qmodel: onnx.ModelProto, float_model: onnx.ModelProto, keep: set[str]) -> None:
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
    kept = [i for i in g.initializer if i.name in inputs or "_Transposed" not in i.name]
    del g.initializer[:]
    g.initializer.extend(kept)


def _replace_initializer(
    graph: onnx.GraphProto, name: str, new: list[TensorProto], node: onnx.NodeProto
) -> None:
    """Swap initializer ``name`` for ``new`` tensors and a ``node`` that outputs ``name`` from them."""
    kept = [i for i in graph.initializer if i.name != name]
    del graph.initializer[:]
    graph.initializer.extend([*kept, *new])
    graph.node.insert(0, node)


def _half_weight(graph: onnx.GraphProto, w: _Weight) -> None:
    """Store the weight as float16 (half the bytes) and Cast it to float for ORT's CPU kernels."""
    h_name = f"{w.init}_fp16"
    half = numpy_helper.from_array(w.q_onnx().astype(np.float16), h_name)
    cast = helper.make_node("Cast", [h_name], [w.init], to=TensorProto.FLOAT, name=f"{w.init}_Cast")
    _replace_initializer(graph, w.init, [half], cast)


def _weight_only_dq(graph: onnx.GraphProto, w: _Weight) -> None:
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


class OnnxRuntimeBackend(Backend):
    """ONNX Runtime on the CPU execution provider (``cpu``) or the CUDA one (``cuda:N``)."""

    name = "onnxruntime"
    stored_bits = (2, 3, 4, 5, 6, 8, 16, 32)
    # 5- to 8-bit grids run on ORT's int8 kernels; 2-4 bits are stored packed in INT4 and 16 as
    # float16, both converted to float at run time: smaller, not faster (the search measures it)
    native_bits = (5, 6, 8, 32)
    sparsity_kinds = ("unstructured",)  # stored dense: zeros save neither bytes nor time
    reduce_range = not cpu_has_vnni()
    # activations stay int8 across Relu / pooling / Add / Concat between int8 layers (ORT's int8 kernels);
    # False quantizes the compute layers only (the QDQ graph AMCT adapts for Ascend)
    int8_connectors = True
    preferred_channel_multiple = 8  # MLAS packs AVX2 GEMM/conv panels of 8 floats (int8: 8+ columns)
    devices = ("cpu", "cuda:0")
    artifact_suffix = ".onnx"

    @classmethod
    def unavailable_reason(cls, device: str) -> str | None:
        if device == "cpu":
            return None
        try:
            kind, _ = parse_device(device)
        except BackendError as exc:
            return str(exc)
        if kind != "cuda":
            return f"device {device!r} is not supported (cpu, or cuda:N with the CUDA execution provider)"
        ort = _ort()
        available = ort.get_available_providers()
        if "CUDAExecutionProvider" not in available:
            return (
                f"this onnxruntime {ort.__version__} has no CUDAExecutionProvider (available: "
                f"{', '.join(available)}); install onnxruntime-gpu (and a CUDA driver) for cuda:N"
            )
        return None

    def __init__(self, device: str = "cpu", batch_size: int = 1, threads: int = 1, **options):
        reason = self.unavailable_reason(device)
        if reason:
            raise BackendError(f"onnxruntime backend: device {device!r} is not supported here: {reason}")
        unknown = set(options) - {"isolate", "pin_core", "timing"}
        if unknown:
            raise BackendError(
                f"onnxruntime backend: unknown option(s) {sorted(unknown)}; known: isolate, pin_core, timing"
            )
        super().__init__(device, batch_size, threads, **options)
        self._worker: WorkerClient | None = None

    # -- lowering -------------------------------------------------------------------------------
    def lower(self, model, example_inputs, precisions, out_dir, calibration=None, io=None) -> Artifact:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        quantized = {k: b for k, b in precisions.items() if b < 32}
        if quantized and calibration is None:
            raise BackendError("onnxruntime backend: quantized layers need calibration inputs")
        if isinstance(calibration, np.ndarray):
            calibration = (calibration,)
        with tempfile.TemporaryDirectory(prefix="ac-ort-") as tmp:
            fp32 = Path(tmp) / "float.onnx"
            try:
                export_onnx(model, example_inputs, fp32, io=io)
            except Exception as exc:
                raise ExportError(f"torch.onnx.export failed: {type(exc).__name__}: {exc}") from exc
            target = out_dir / "model.onnx"
            fusions: dict = {}
            if quantized:
                self._quantize(model, fp32, target, quantized, calibration, Path(tmp))
            else:  # float: the fastest of the graph and its transformer-fused versions (measured)
                kept, fusions = self._optimize_float(model, fp32, example_inputs, Path(tmp))
                shutil.copyfile(kept, target)
            kernels = self._kernels(target, Path(tmp) / "optimized.onnx")
        packed = stored = 0.0
        for name, p in model.named_parameters():
            owner, _, kind = name.rpartition(".")
            bits = quantized.get(owner, 32) if kind.startswith("weight") else 32  # LSTM: weight_ih_l0
            packed += p.numel() * bits / 8
            stored += p.numel() * container_bits(bits) / 8
        return Artifact(
            path=target,
            backend=self.name,
            device=self.device,
            size_bytes=target.stat().st_size,
            packed_size_bytes=round(packed),
            precisions=dict(precisions),
            meta={
                "kernels": kernels,
                "transformer_fusions": fusions.get("transformer_fusions", {}),
                "float_optimization": {k: fusions.get(k) for k in ("variant", "decision", "unfused_ms")},
                "reduce_range": self.reduce_range,
                "weights_stored_bytes": round(stored),
            },
        )

    def _optimize_float(self, model, fp32: Path, example_inputs, tmp: Path) -> tuple[Path, dict]:
        """ORT's transformer fusions where they apply and measure faster (see :mod:`.ort_fusions`)."""
        from .ort_fusions import optimize_float, transformer_like

        if not transformer_like(onnx.load(str(fp32), load_external_data=False).graph):
            return fp32, {"decision": "not a transformer", "variant": "none"}
        cfg = getattr(model, "config", None)
        feed = dict(zip(graph_input_names(fp32), self._feed(example_inputs), strict=True))
        return optimize_float(
            fp32,
            None,
            out_dir=tmp,
            num_heads=int(getattr(cfg, "num_attention_heads", 0) or 0),
            hidden_size=int(getattr(cfg, "hidden_size", 0) or 0),
            feed=feed,
            threads=self.threads,
            measure=lambda paths: self._time(paths, example_inputs),
        )

    def _quantize(
        self, model, fp32: Path, target: Path, quantized: dict[str, int], calibration: np.ndarray, tmp: Path
    ) -> None:
        """Dynamic int8 layers (Linear, LSTM): quantize_dynamic restricted to their nodes; then 5- to
        8-bit static layers: int8 QDQ via quantize_static (fused by ORT into int8 kernels); 2- to 4-bit
        layers: INT4 weight-only DequantizeLinear; 16: float16 weights + Cast."""
        float_model = onnx.load(str(fp32))
        if any(b <= 4 for b in quantized.values()):
            float_model = onnx.version_converter.convert_version(float_model, 21)  # INT4 needs opset 21
            onnx.save(float_model, str(fp32))
        modules = dict(model.named_modules())
        located: list[_Weight] = []
        recurrent: list[str] = []
        for layer, bits in quantized.items():
            module = modules[layer]
            if isinstance(module, RECURRENT):
                if isinstance(module, torch.nn.GRU):
                    raise BackendError(
                        f"onnxruntime backend: layer {layer!r}: dynamic quantization of GRU is not supported "
                        "(ORT's quantize_dynamic quantizes MatMul/Gemm and LSTM only); keep it at bits 32"
                    )
                recurrent.append(layer)
                continue
            weight = module.weight.detach()
            mode = getattr(module, MODE_ATTR, "static")
            record: WeightQuant | None = getattr(module, QUANT_ATTR, None)
            zero = None
            if bits == 16:
                q, scale = weight.half().numpy(), np.ones(weight.shape[0], np.float32)
            elif record is not None and record.bits == bits:
                q, scale = record.q, record.scale.astype(np.float32)
                zero = record.zero_point if record.scheme == "asymmetric" else None
            else:  # not from compress(): the symmetric per-channel min-max grid
                qi, sc = quantize_weight(weight, qmax_for(bits, self.reduce_range))
                q, scale = qi.numpy(), sc.numpy().astype(np.float32)
            taken = {w.init for w in located}
            located.append(
                _locate(float_model.graph, layer, weight.numpy(), bits, q, scale, taken, zero, mode)
            )
        qmodel, current = float_model, fp32
        dynamic = [w for w in located if w.mode == "dynamic"]
        if dynamic or recurrent:
            nodes = [n for w in dynamic for n in w.nodes]
            for layer in recurrent:
                found = _lstm_nodes(float_model.graph, modules[layer])
                if not found:
                    raise BackendError(
                        f"cannot find the ONNX LSTM node of layer {layer!r} in the exported graph"
                    )
                nodes += found
            qmodel = self._quantize_dynamic(current, tmp / "dynamic.onnx", nodes)
            _restore_gemms(qmodel, float_model, set(nodes))
            _write_dynamic_integers(qmodel, dynamic)
            current = tmp / "dynamic_restored.onnx"
            onnx.save(qmodel, str(current))
        eight = [w for w in located if 5 <= w.bits <= 8 and w.mode == "static"]
        if eight:
            nodes = [n for w in eight for n in w.nodes]
            if self.int8_connectors:
                nodes = int8_region(onnx.load(str(current)).graph, nodes)
            method = getattr(model, CALIBRATION_ATTR, "minmax")
            qmodel = self._quantize_static(current, tmp / "qdq.onnx", nodes, calibration, method)
            _write_trained_integers(qmodel, float_model, eight)
        for w in located:
            if w.bits <= 4:
                _weight_only_dq(qmodel.graph, w)
            elif w.bits == 16:
                _half_weight(qmodel.graph, w)
        onnx.save(qmodel, str(target))

    def _quantize_dynamic(self, fp32: Path, out: Path, nodes: list[str]):
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
                    reduce_range=self.reduce_range,
                    weight_type=QuantType.QInt8,
                    nodes_to_quantize=targets,
                    op_types_to_quantize=["MatMul", "LSTM"],
                    extra_options={"WeightSymmetric": True, "MatMulConstBOnly": True},
                )
            except Exception as exc:
                raise ExportError(
                    f"onnxruntime quantize_dynamic failed: {type(exc).__name__}: {exc}"
                ) from exc
        return onnx.load(str(out))

    def _quantize_static(
        self, fp32: Path, out: Path, nodes: list[str], calibration: np.ndarray, method: str = "minmax"
    ):
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        extra = {"WeightSymmetric": True, "ActivationSymmetric": False}
        if method == "percentile":
            extra.update(CalibPercentile=PERCENTILE, CalibTensorRangeSymmetric=False)
        with _quiet():
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
        return onnx.load(str(out))

    # -- running --------------------------------------------------------------------------------
    def session(self, path: Path, optimized_path: Path | None = None):
        return make_session(path, self.threads, optimized_path, self.device)

    def _kernels(self, path: Path, optimized: Path) -> dict[str, int]:
        """Op types in the graph ORT actually runs (after its fusions), with counts."""
        self.session(path, optimized)
        return dict(Counter(n.op_type for n in onnx.load(str(optimized)).graph.node))

    def runner(self, artifact: Artifact):
        sess = self.session(artifact.path)
        names = [i.name for i in sess.get_inputs()]

        def run(inputs: tuple[np.ndarray, ...]) -> np.ndarray:
            return sess.run(None, dict(zip(names, inputs, strict=True)))[0]

        return run

    def _feed(self, example_inputs) -> tuple[np.ndarray, ...]:
        return repeat_to_batch(example_inputs, self.batch_size)

    def time_local(self, artifacts: list[Artifact], x, **limits) -> list[LatencyStats]:
        """Time artifacts side by side in this process (the timing worker calls this).

        ``x``: the feed, one array per graph input (a single array for one input).
        """
        xs = (x,) if isinstance(x, np.ndarray) else tuple(x)
        sessions = [self.session(a.path) for a in artifacts]
        feeds = [dict(zip([i.name for i in s.get_inputs()], xs, strict=True)) for s in sessions]
        fns = [lambda s=s, f=f: s.run(None, f) for s, f in zip(sessions, feeds, strict=True)]
        return time_callables(fns, device=self.device, batch_size=len(xs[0]), **limits)

    def _time(self, paths: list[Path], example_inputs) -> list[LatencyStats]:
        """Time artifacts side by side under the device lock, in the timing worker by default.

        The worker is a clean process (see :mod:`.worker`): torch's OpenMP threads in the search
        process keep spinning after training and would be timed along with the artifact.
        """
        x = self._feed(example_inputs)
        limits = self.options.get("timing", {})
        artifacts = [self.load_artifact(Path(p)) for p in paths]
        with device_lock(self.device):
            if not self.options.get("isolate", True):
                return self.time_local(artifacts, x, **limits)
            if self._worker is None:
                self._worker = WorkerClient(self.threads)
            return self._worker.time(self, paths, x, limits, {})

    def measure(self, artifact: Artifact, example_inputs) -> LatencyStats:
        return self._time([artifact.path], example_inputs)[0]

    def measure_pair(self, artifact: Artifact, reference: Artifact, example_inputs):
        a, b = self._time([artifact.path, reference.path], example_inputs)
        return a, b

    def close(self) -> None:
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.close()

    def __del__(self):  # the worker must not outlive its backend
        with contextlib.suppress(Exception):
            self.close()

    def versions(self) -> dict[str, str]:
        return {**super().versions(), "onnxruntime": _ort().__version__, "onnx": onnx.__version__}

    def device_info(self) -> dict:
        return cpu_info() if self.device == "cpu" else nvidia_smi_info(parse_device(self.device)[1])

    def fingerprint(self, artifact: Artifact) -> str | None:
        from .cache import onnx_fingerprint

        return onnx_fingerprint(artifact.path)

    def load_artifact(self, path: Path) -> Artifact:
        art = super().load_artifact(path)
        if Path(path).suffix != ".onnx":
            raise BackendError(f"onnxruntime backend: {path} is not an .onnx file")
        return art

    def example_inputs_for(self, artifact: Artifact) -> tuple[torch.Tensor, ...]:
        model = onnx.load(str(artifact.path), load_external_data=False)
        inits = {i.name for i in model.graph.initializer}
        out = []
        for v in model.graph.input:
            if v.name in inits:
                continue
            dims = [
                d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1
                for d in v.type.tensor_type.shape.dim
            ]
            dtype = onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)
            out.append(torch.from_numpy(np.zeros(dims, dtype=dtype)))
        return tuple(out)
