"""The Ascend host kit: ``autocompress doctor --device npu``.

On a host with the NPU driver, the CANN toolkit (ATC), torch_npu, AMCT (amct_onnx) and ais_bench it
runs, in order, and writes everything into one self-contained Markdown report a user can send back:

1. versions (Python, torch, torch_npu, onnx, onnxruntime, CANN, AMCT, ais_bench) and ``npu-smi info``;
2. the backend conformance suite for ``ascend`` and ``torch:npu`` and the ascend / torch backend tests;
3. one int8 model (through AMCT and ATC) and one fp16 model lowered, timed on the NPU, and their outputs
   compared with the torch model's (the int8 one also through AMCT's fake-quant model on the CPU);
4. a 6-trial study over bits {8, 16, 32} on ``ascend`` (built-in digits task) and its Pareto front.

On any other machine it prints exactly what is missing and exits 2; it never pretends a check ran.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
TEST_FILES = (
    "tests/backends/test_conformance.py",
    "tests/backends/test_ascend.py",
    "tests/backends/test_torch_backend.py",
)


def _module_missing(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is None
    except (ImportError, ValueError):
        return True


def missing_requirements() -> list[str]:
    """One line per thing this machine lacks for the Ascend host check (empty: all present)."""
    from .backends.amct import AMCT_HINT, AMCT_PACKAGE
    from .backends.ascend_cann import AIS_BENCH_HINT, ATC_HINT

    out = []
    if shutil.which("npu-smi") is None:
        out.append(
            "`npu-smi` is not on PATH: no Ascend NPU driver here (install the NPU driver and firmware)"
        )
    if shutil.which("atc") is None:
        out.append(f"`atc` (CANN's model converter) is not on PATH: {ATC_HINT}")
    if not (os.environ.get("ASCEND_TOOLKIT_HOME") or os.environ.get("ASCEND_HOME_PATH")):
        out.append(
            "the CANN environment is not set (ASCEND_TOOLKIT_HOME / ASCEND_HOME_PATH): "
            "`source /usr/local/Ascend/ascend-toolkit/set_env.sh`"
        )
    if _module_missing("torch_npu"):
        import torch

        out.append(
            f"Python package torch_npu is not installed: pip install torch-npu matching torch "
            f"{torch.__version__.split('+')[0]} (the project's [npu] extra)"
        )
    if _module_missing(AMCT_PACKAGE):
        out.append(f"Python package {AMCT_PACKAGE} is not installed: {AMCT_HINT}")
    for name in ("ais_bench", "aclruntime"):
        if _module_missing(name):
            out.append(f"Python package {name} is not installed: {AIS_BENCH_HINT}")
    absent = [f for f in TEST_FILES if not (ROOT / f).is_file()]
    if absent:
        out.append(f"the test suite is not here ({', '.join(absent)} under {ROOT}): run from a checkout")
    return out


def _versions() -> dict[str, str]:
    v = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in (
        "autocompress",
        "torch",
        "torch_npu",
        "onnx",
        "onnxruntime",
        "optuna",
        "amct_onnx",
        "ais_bench",
    ):
        try:
            v[name] = getattr(importlib.import_module(name), "__version__", "unknown")
        except Exception as exc:  # noqa: BLE001 - the report says what failed
            v[name] = f"not importable ({type(exc).__name__}: {exc})"
    from .backends.ascend_cann import cann_version

    v["cann"] = cann_version()
    return v


def _run(cmd: list[str], timeout_s: int) -> tuple[int, str, float]:
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout_s)
        rc, text = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as exc:
        rc, text = 124, f"timed out after {timeout_s} s\n{exc.stdout or ''}"
    return rc, text, time.perf_counter() - t0


def _int8_copy(model):
    """A copy of ``model`` and its lowering spec with the QAT integers recorded as a trial's finalize step
    records them (conv weights per channel, Linear weights per tensor: what the ascend space asks)."""
    import copy

    from torch import nn
    from torch.nn.utils import parametrize

    from .inventory import compressible_layers
    from .lowering import LayerLowering, LoweringSpec
    from .techniques.quantize import add_fake_quant, record_weight_quant

    m = copy.deepcopy(model).eval()
    layers = {}
    for name, mod in compressible_layers(m):
        add_fake_quant(mod, 8, granularity="tensor" if isinstance(mod, nn.Linear) else "channel")
        layers[name] = LayerLowering(8, "static", record_weight_quant(mod))
        parametrize.remove_parametrizations(mod, "weight", leave_parametrized=True)
    return m, LoweringSpec(layers)


def lower_two_models(workdir: Path) -> list[str]:
    """Lower one int8 and one fp16 model on npu:0; Markdown lines with what was measured."""
    import numpy as np
    import torch

    from .backends import AscendBackend
    from .backends.ascend_cann import ais_bench_command, parse_ais_bench_summary
    from .inventory import compressible_layers
    from .techniques import fold_batchnorm
    from .testing import PlainCNN

    torch.manual_seed(0)
    base = fold_batchnorm(PlainCNN(width=32).eval())[0]
    ex = PlainCNN.example_inputs(1)
    x = PlainCNN.example_inputs(64)[0]
    lines = []
    backend = AscendBackend("npu:0")

    def max_diff(out, ref):
        return float(np.abs(out - ref).max())

    try:
        int8, int8_spec = _int8_copy(base)
        fp16_spec = {n: 16 for n, _ in compressible_layers(base)}
        for label, model, spec in (("int8", int8, int8_spec), ("fp16", base, fp16_spec)):
            art = backend.lower(model, ex, spec, workdir / label, calibration=x.numpy())
            with torch.no_grad():
                ref = model(x).numpy()
            diff = backend.evaluate(art, x.numpy(), ref, max_diff)
            lat = backend.measure(art, ex)
            lines += [
                f"### {label}: {art.path} ({art.size_bytes} bytes)",
                f"- ATC input: {art.meta['atc_input']}; precision mode {art.meta['precision_mode']}; "
                f"fp32 kept: {art.meta['keep_fp32'] or 'none'}",
                f"- measured: {art.meta['measured']}",
                f"- max |om - torch| over 64 inputs: {diff:.4g}",
                f"- latency: median {lat.median_ms:.4f} ms, p90 {lat.p90_ms:.4f} ms, n {lat.n}",
            ]
            rc, text, _ = _run(ais_bench_command(art.path, 0), 600)  # ais_bench's own summary, beside ours
            try:
                npu = parse_ais_bench_summary(text)["NPU_compute_time"]
                lines.append(
                    f"- ais_bench CLI: NPU_compute_time median {npu['median']:.4f} ms, mean {npu['mean']:.4f}"
                )
            except Exception as exc:  # noqa: BLE001 - the report carries the reason
                lines.append(
                    f"- ais_bench CLI (exit {rc}) gave no summary: {exc}; tail: {text.strip()[-500:]}"
                )
            if art.meta.get("fake_quant"):
                cpu = AscendBackend("npu:0", evaluate_on="cpu")
                lines.append(
                    f"- max |fake-quant ONNX on CPU - torch|: {cpu.evaluate(art, x.numpy(), ref, max_diff):.4g}"
                )
    finally:
        backend.close()
    return lines


STUDY = {
    "name": "ascend_host_check",
    "task": {"name": "digits", "options": {"width": 16, "teacher_epochs": 3}},
    "space": {
        "file": "default.yaml",
        "overrides": {"bits": {"choices": [8, 16, 32]}},
    },
    "finetune": {"epochs": 1},
    "backend": {"name": "ascend", "device": "npu:0", "batch_size": 1},
    "trials": {"n": 6, "warm_start": []},
    "seed": 0,
}


def run_study(workdir: Path) -> tuple[int, str]:
    study = workdir / "study.yaml"
    study.write_text(yaml.safe_dump(STUDY))
    out = workdir / "study"
    cli = [sys.executable, "-m", "autocompress.cli"]
    rc, text, _ = _run([*cli, "run", str(study), "--output", str(out)], 3600)
    if rc == 0:
        rc2, front, _ = _run([*cli, "report", str(out)], 600)
        text += f"\n--- autocompress report (exit {rc2}) ---\n{front}"
        rc = rc or rc2
    return rc, text


def _section(title: str, fn: Callable[[], tuple[int, str]]) -> tuple[int, str]:
    t0 = time.perf_counter()
    try:
        rc, body = fn()
    except Exception:  # noqa: BLE001 - the report carries the traceback
        rc, body = 1, traceback.format_exc()
    status = "passed" if rc == 0 else f"FAILED (exit {rc})"
    return (
        rc,
        f"## {title}: {status} ({time.perf_counter() - t0:.0f} s)\n\n```\n{body.strip()[-20000:]}\n```\n",
    )


def host_check(report: Path, workdir: Path) -> int:
    """Run every check and write ``report``; 0 when all passed, 1 otherwise, 2 when things are missing."""
    missing = missing_requirements()
    if missing:
        print("autocompress doctor --device npu: this machine cannot run the Ascend host check; missing:")
        for line in missing:
            print(f"  - {line}")
        print("nothing was run and no report was written")
        return 2
    from .backends.device_facts import npu_smi_text

    workdir.mkdir(parents=True, exist_ok=True)
    py = [sys.executable, "-m", "pytest", "-q", "-rs"]
    sections = [
        (
            "Backend conformance suite (ascend:npu:0, torch:npu:0)",
            lambda: _run([*py, TEST_FILES[0], "--backend", "ascend:npu:0", "--backend", "torch:npu:0"], 3600)[
                :2
            ],
        ),
        ("ascend and torch backend tests", lambda: _run([*py, *TEST_FILES[1:]], 3600)[:2]),
        (
            "One int8 and one fp16 model on npu:0",
            lambda: (0, "\n".join(lower_two_models(workdir / "lowered"))),
        ),
        ("6-trial study on ascend (bits 8 / 16 / 32)", lambda: run_study(workdir)),
    ]
    parts = ["# autocompress Ascend host check", "", "## Versions", ""]
    parts += [f"- {k}: {v}" for k, v in _versions().items()]
    parts += ["", "## npu-smi info", "", "```", npu_smi_text().rstrip(), "```", ""]
    worst = 0
    for title, fn in sections:
        print(f"running: {title}", flush=True)
        rc, text = _section(title, fn)
        worst = worst or (1 if rc else 0)
        parts.append(text)
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text("\n".join(parts))
    print(f"report written to {report} ({'all passed' if worst == 0 else 'some checks FAILED'})")
    return worst
