"""ONNX Runtime sessions: the runtime import, execution providers, session options, CPU facts.

The lowest layer of the ONNX Runtime backend: :mod:`.onnxruntime`, :mod:`.ort_fusions` and
:mod:`.ascend` (its CPU checks of fake-quant graphs) open sessions through :func:`make_session`.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import MissingDependencyError, RuntimeLoadError
from .base import parse_device
from .device_facts import cpu_has_vnni  # noqa: F401 - re-exported


def ort_module():
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
    ort = ort_module()
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
