"""What this machine is: CPU name and instruction-set features, GPUs (nvidia-smi), NPUs (npu-smi).

The one place that probes the hardware. Every backend, ``autocompress doctor`` and the run records
(:func:`environment`) read their device facts from here; no backend reads another backend's module
for them. Each probe runs once per process (cached) and answers ``None`` / empty where the tool or
file is absent.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import re
import shutil
import subprocess
from pathlib import Path

# --- CPU ----------------------------------------------------------------------------------------------


@functools.cache
def cpu_flags() -> str:
    """``/proc/cpuinfo`` as text (empty where it cannot be read)."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:  # pragma: no cover - not Linux
        return ""


def cpu_has_any(features: tuple[str, ...] | list[str]) -> bool:
    """Whether the CPU lists one of ``features`` (``/proc/cpuinfo`` flag names, e.g. ``avx512_vnni``)."""
    flags = cpu_flags()
    return any(f in flags for f in features)


@functools.cache
def cpu_has_vnni() -> bool:
    """True when the CPU has VNNI (or AMX) int8 dot-product instructions."""
    return cpu_has_any(("avx512_vnni", "avx_vnni", "amx_int8"))


def cpu_info() -> dict:
    """Name of the CPU, logical cores this process may use, no driver."""
    name = platform.processor() or platform.machine()
    for line in cpu_flags().splitlines():
        if line.startswith("model name"):
            name = line.split(":", 1)[1].strip()
            break
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        count = os.cpu_count()
    return {"name": name, "count": count, "driver": None}


# --- NVIDIA GPUs --------------------------------------------------------------------------------------


@functools.cache
def nvidia_smi_info(idx: int) -> dict:
    """GPU ``idx``'s name, the GPU count and the driver version, from nvidia-smi (None where absent)."""
    info = {"name": None, "count": None, "driver": None}
    if shutil.which("nvidia-smi") is None:
        return info
    try:
        out = (
            subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            )
            .stdout.strip()
            .splitlines()
        )
    except (OSError, subprocess.SubprocessError):
        return info
    rows = [[c.strip() for c in line.split(",")] for line in out if line.strip()]
    if idx < len(rows):
        info.update(name=rows[idx][0], count=len(rows), driver=rows[idx][1])
    return info


# --- Ascend NPUs --------------------------------------------------------------------------------------

_NPU_SMI_VERSION = re.compile(r"npu-smi\s+\S+\s+Version:\s*(\S+)")
_NPU_SMI_CHIP = re.compile(
    r"^\|\s*(\d+)\s+([0-9A-Za-z_]+)\s*\|\s*(OK|Warning|Alarm|Critical|\w+)\s*\|", re.MULTILINE
)


def parse_npu_smi(text: str) -> dict:
    """Driver version and chips from ``npu-smi info``: ``{"driver": "23.0.6", "chips": [(0, "910B4")]}``."""
    m = _NPU_SMI_VERSION.search(text)
    chips = [(int(c.group(1)), c.group(2)) for c in _NPU_SMI_CHIP.finditer(text)]
    return {"driver": m.group(1) if m else None, "chips": chips}


@functools.cache
def npu_smi_text() -> str:
    """The output of ``npu-smi info`` (empty when npu-smi is absent or fails)."""
    if shutil.which("npu-smi") is None:
        return ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        return subprocess.run(["npu-smi", "info"], capture_output=True, text=True, timeout=30).stdout
    return ""


def npu_smi_facts() -> dict:
    """Driver and chips of this machine's NPUs (empty when npu-smi is absent)."""
    text = npu_smi_text()
    return parse_npu_smi(text) if text else {}


# --- what a run records -------------------------------------------------------------------------------


def environment(backend) -> dict:
    """Where a trial ran (``backend``: any :class:`~autocompress.backends.base.Backend`): backend, device (name, count, driver), library versions, capabilities."""
    dev = backend.device_info()
    return {
        "backend": backend.name,
        "device": backend.device,
        "device_name": dev.get("name"),
        "device_count": dev.get("count"),
        "device_driver": dev.get("driver"),
        "cpu_count": os.cpu_count(),
        "host": platform.node(),
        "python": platform.python_version(),
        "capabilities": backend.capabilities(),
        **{f"version.{k}": v for k, v in backend.versions().items()},
    }
