"""Deployment backends: one module per backend, registered by name."""

from __future__ import annotations

from ..registry import Registry
from .base import Artifact, Backend, LatencyStats, device_lock, time_callable
from .onnxruntime import OnnxRuntimeBackend

BACKENDS: Registry[type[Backend]] = Registry("backend")
BACKENDS.add(OnnxRuntimeBackend.name, OnnxRuntimeBackend)

__all__ = [
    "BACKENDS",
    "Artifact",
    "Backend",
    "LatencyStats",
    "OnnxRuntimeBackend",
    "device_lock",
    "time_callable",
]
