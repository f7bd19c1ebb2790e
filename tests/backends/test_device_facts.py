"""The one device-facts probe: CPU, nvidia-smi, npu-smi; backends read it, not each other."""

from __future__ import annotations

import ast
import pathlib
import stat

import pytest

import autocompress.backends as backends_pkg
from autocompress.backends import device_facts as df

# backend -> its modules (ascend_cann holds the ascend backend's CANN tool helpers)
BACKENDS = {"onnxruntime": ("onnxruntime",), "torch": ("torch_backend",), "ascend": ("ascend", "ascend_cann")}
BACKEND_MODULES = tuple(m for mods in BACKENDS.values() for m in mods)


def test_cpu_info_and_flags():
    info = df.cpu_info()
    assert set(info) == {"name", "count", "driver"}
    assert info["count"] >= 1 and info["driver"] is None
    assert isinstance(df.cpu_has_vnni(), bool)
    assert df.cpu_has_any(()) is False


def test_parse_npu_smi():
    text = (
        "| npu-smi 23.0.6                   Version: 23.0.6       |\n"
        "| 0     910B4               | OK            | 95.9        39 |\n"
        "| 1     910B4               | OK            | 90.1        38 |\n"
    )
    assert df.parse_npu_smi(text) == {"driver": "23.0.6", "chips": [(0, "910B4"), (1, "910B4")]}
    assert df.parse_npu_smi("") == {"driver": None, "chips": []}


def test_nvidia_smi_parsed_from_a_fake_tool(tmp_path, monkeypatch):
    tool = tmp_path / "nvidia-smi"
    tool.write_text("#!/bin/sh\necho 'NVIDIA H200, 550.54.15'\necho 'NVIDIA H200, 550.54.15'\n")
    tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", str(tmp_path))
    df.nvidia_smi_info.cache_clear()
    try:
        assert df.nvidia_smi_info(1) == {"name": "NVIDIA H200", "count": 2, "driver": "550.54.15"}
        assert df.nvidia_smi_info(5) == {"name": None, "count": None, "driver": None}
    finally:
        df.nvidia_smi_info.cache_clear()


@pytest.mark.parametrize("name", BACKEND_MODULES)
def test_backends_do_not_import_each_other_for_device_facts(name):
    """No backend module imports another backend module at module level (device facts, ONNX export
    names: shared modules); only device_facts runs nvidia-smi / npu-smi."""
    src = (pathlib.Path(backends_pkg.__file__).parent / f"{name}.py").read_text()
    tree = ast.parse(src)
    top = [n for n in tree.body if isinstance(n, ast.ImportFrom) and n.level == 1]
    others = {m for mods in BACKENDS.values() if name not in mods for m in mods}
    assert not [n.module for n in top if n.module in others]
    assert "nvidia-smi" not in src and '"npu-smi"' not in src
