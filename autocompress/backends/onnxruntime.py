"""ONNX Runtime backend: QDQ int8 / INT4 / float16 artifacts with real int8 kernels on the CPU provider.

Device ``cpu`` (the default) runs the CPU execution provider; ``cuda:N`` runs the CUDA execution
provider on GPU N where this onnxruntime has it (the ``onnxruntime-gpu`` package), falling back to
the CPU provider for nodes CUDA does not implement, as ORT does.

Lowering (see :mod:`.ort_quantize` for the steps, :mod:`.onnx_rewrite` for the graph surgery):
``torch.onnx.export`` of the finalized model, then the layers of the
:class:`~autocompress.lowering.LoweringSpec` below float: dynamic int8 through ORT's
``quantize_dynamic``, 5- to 8-bit static layers through ORT's ``quantize_static`` (QDQ, with the
connectors between int8 layers) with the fine-tune's integers, scales and zero points written back,
2- to 4-bit layers as packed INT4 weight-only DequantizeLinear, 16-bit ones as float16 + Cast (ORT
computes both in float). Embedding tables below float are stored packed (int8, or two 4-bit values a
byte) and only the rows a lookup reads are dequantized (see :func:`.onnx_lookup.lookup_weight_only`).
A float model gets the fastest of its graph and its transformer-fused versions.

Asymmetric int8 weights (non-zero zero points) fuse into QLinearConv / QGemm like symmetric ones; on
CPUs without VNNI both use a 7-bit grid (``reduce_range``), on which ORT's fused kernels give the same
outputs as the unfused QDQ graph (a full 8-bit grid saturates there).
"""

from __future__ import annotations

import contextlib
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import torch

from ..errors import BackendError, ExportError
from ..lowering import LoweringSpec
from ..scratch import scratch_dir
from .base import (
    Artifact,
    Backend,
    LatencyStats,
    device_lock,
    parse_device,
    repeat_to_batch,
    time_callables,
    wrong_device,
)
from .device_facts import cpu_info, nvidia_smi_info
from .onnx_compact import compact_artifact
from .onnx_export import INPUT, OUTPUT, default_io, export_onnx, graph_input_names  # noqa: F401 - re-exported
from .onnx_rewrite import container_bits
from .ort_quantize import _Calibration, _quiet, quantize_graph  # noqa: F401 - re-exported
from .ort_session import cpu_has_vnni, make_session, ort_module, providers_for  # noqa: F401 - re-exported
from .worker import WorkerClient


class OnnxRuntimeBackend(Backend):
    """ONNX Runtime on the CPU execution provider (``cpu``) or the CUDA one (``cuda:N``)."""

    name = "onnxruntime"
    stored_bits = (2, 3, 4, 5, 6, 8, 16, 32)
    # 5- to 8-bit grids run on ORT's int8 kernels; 2-4 bits are stored packed in INT4 and 16 as
    # float16, both converted to float at run time: smaller, not faster (the search measures it)
    native_bits = (5, 6, 8, 32)
    # embedding tables: every stored precision, weight-only and dequantized after the lookup (int8 rows
    # gathered then scaled; 2-4 bits through com.microsoft.GatherBlockQuantized; float16 then Cast)
    bits_by_kind = {"Embedding": stored_bits}
    # stored as such (nonzeros + bitmask or relative index, rebuilt at load); dense kernels: no time saved
    sparsity_kinds = ("unstructured", "2:4")
    # weight sharing: packed indices + codebook, rebuilt by ops ORT folds at session load (matmul layers)
    shared_weight_kinds = ("Conv1d", "Conv2d", "Linear")
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
        reason = wrong_device(
            device,
            "cuda",
            f"device {device!r} is not supported (cpu, or cuda:N with the CUDA execution provider)",
        )
        if reason:
            return reason
        ort = ort_module()
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
    def lower(self, model, example_inputs, spec, out_dir, calibration=None, io=None) -> Artifact:
        spec = LoweringSpec.coerce(spec)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        quantized = spec.quantized()
        if quantized and calibration is None:
            raise BackendError("onnxruntime backend: quantized layers need calibration inputs")
        if isinstance(calibration, np.ndarray):
            calibration = (calibration,)
        with scratch_dir("ac-ort-") as tmp:
            fp32 = Path(tmp) / "float.onnx"
            try:
                export_onnx(model, example_inputs, fp32, io=io)
            except Exception as exc:
                raise ExportError(f"torch.onnx.export failed: {type(exc).__name__}: {exc}") from exc
            target = out_dir / "model.onnx"
            fusions: dict = {}
            kept: dict[str, float] = {}
            if quantized:
                kept = quantize_graph(
                    model,
                    fp32,
                    target,
                    spec,
                    calibration,
                    Path(tmp),
                    reduce_range=self.reduce_range,
                    int8_connectors=self.int8_connectors,
                )
            else:  # float: the fastest of the graph and its transformer-fused versions (measured)
                fastest, fusions = self._optimize_float(model, fp32, example_inputs, Path(tmp))
                shutil.copyfile(fastest, target)
            if kept:  # dynamic layers whose input has outliers: lowered float (see .dynamic_outliers)
                spec = spec.only(set(spec.layers) - set(kept))
                quantized = spec.quantized()
            compact = compact_artifact(target, model, spec)
            kernels = self._kernels(target, Path(tmp) / "optimized.onnx")
        packed = stored = 0.0
        for name, p in model.named_parameters():
            owner, _, kind = name.rpartition(".")
            bits = quantized.get(owner, 32) if kind.startswith("weight") else 32  # LSTM: weight_ih_l0
            packed += p.numel() * bits / 8
            stored += p.numel() * container_bits(bits) / 8
        for rec in compact.get("compact_weights", {}).values():  # shared / sparse: what was written
            packed += rec["stored_bytes"] - rec["dense_bytes"]
            stored += rec["stored_bytes"] - rec["dense_bytes"]
        return self.artifact_at(
            target,
            packed,
            spec.layer_bits(),
            {
                "kernels": kernels,
                "transformer_fusions": fusions.get("transformer_fusions", {}),
                "float_optimization": {k: fusions.get(k) for k in ("variant", "decision", "unfused_ms")},
                "reduce_range": self.reduce_range,
                "dynamic_kept_float": kept,
                "weights_stored_bytes": round(stored),
                **compact,
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

    def _time(self, paths: list[Path], example_inputs, limits: dict | None = None) -> list[LatencyStats]:
        """Time artifacts side by side under the device lock, in the timing worker by default.

        The worker is a clean process (see :mod:`.worker`): torch's OpenMP threads in the search
        process keep spinning after training and would be timed along with the artifact.
        """
        x = self._feed(example_inputs)
        limits = {**self.options.get("timing", {}), **(limits or {})}
        artifacts = [self.load_artifact(Path(p)) for p in paths]
        with device_lock(self.device):
            if not self.options.get("isolate", True):
                return self.time_local(artifacts, x, **limits)
            if self._worker is None:
                self._worker = WorkerClient(self.threads)
            return self._worker.time(self, paths, x, limits, {})

    def start_timing(self) -> None:
        """The timing worker starts now (its imports take seconds) while the run sets up."""
        if self.options.get("isolate", True):
            if self._worker is None:
                self._worker = WorkerClient(self.threads)
            self._worker.start()

    def measure(self, artifact: Artifact, example_inputs) -> LatencyStats:
        return self._time([artifact.path], example_inputs)[0]

    def measure_pair(self, artifact: Artifact, reference: Artifact, example_inputs):
        a, b = self._time([artifact.path, reference.path], example_inputs)
        return a, b

    def measure_group(self, artifacts: list[Artifact], reference: Artifact, example_inputs, **limits):
        ref, *stats = self._time([reference.path, *(a.path for a in artifacts)], example_inputs, limits)
        return [(s, ref) for s in stats]

    def close(self) -> None:
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.close()

    def __del__(self):  # the worker must not outlive its backend
        with contextlib.suppress(Exception):
            self.close()

    def versions(self) -> dict[str, str]:
        return {**super().versions(), "onnxruntime": ort_module().__version__, "onnx": onnx.__version__}

    def device_info(self) -> dict:
        return cpu_info() if self.device == "cpu" else nvidia_smi_info(parse_device(self.device)[1])

    def fingerprint(self, artifact: Artifact) -> str | None:
        from .cache import onnx_fingerprint

        return onnx_fingerprint(artifact.path)

    def example_inputs_for(self, artifact: Artifact) -> tuple[torch.Tensor, ...]:
        try:
            model = onnx.load(str(artifact.path), load_external_data=False)
        except Exception as exc:  # protobuf's DecodeError and kin: not an ONNX model at all
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise BackendError(f"the file is not an ONNX model ({type(exc).__name__}: {first})") from None
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
