"""Deployment backends: one module per backend, registered by name."""

from __future__ import annotations

from ..registry import Registry
from .ascend import AscendBackend
from .base import Artifact, Backend, LatencyStats, device_lock, time_callable, time_callables
from .cache import LatencyCache, timed_or_cached
from .onnxruntime import OnnxRuntimeBackend
from .torch_backend import TorchBackend

BACKENDS: Registry[type[Backend]] = Registry("backend")
BACKENDS.add(OnnxRuntimeBackend.name, OnnxRuntimeBackend)
BACKENDS.add(TorchBackend.name, TorchBackend)
BACKENDS.add(AscendBackend.name, AscendBackend)

__all__ = [
    "BACKENDS",
    "Artifact",
    "AscendBackend",
    "Backend",
    "LatencyCache",
    "LatencyStats",
    "OnnxRuntimeBackend",
    "TorchBackend",
    "device_lock",
    "timed_or_cached",
    "time_callable",
    "time_callables",
]
