"""Ascend NPU backend: ONNX (exported as the onnxruntime backend does) -> ATC offline model (.om),
evaluated and timed through ais_bench's ``InferSession``.

Documentation followed (read, not copied):
* CANN graph developer guide, "Converting an ONNX Model Using ATC Commands" (hiascend.com):
  ``atc --model=<x.onnx> --framework=5 --output=<dir/name> --soc_version=<Ascend + the Name column
  of npu-smi info>``; ``--input_shape="<input>:N,C,H,W"`` fixes the batch axis; ``--output`` names
  the file without its ``.om`` suffix. ATC prints ``ATC run success, welcome to the next use.`` on
  success and ``ATC run failed, Please check the detail log, ...`` followed by error-code lines
  (``E10001: ...``, ``EZ3003: ...``) on failure.
* ait benchmark (ais_bench) interface API guide: ``from ais_bench.infer.interface import
  InferSession``; ``InferSession(device_id, model_path)``; ``session.infer(feeds, mode="static")``
  returns numpy outputs; ``session.get_inputs()`` describes the inputs. Its command line prints
  ``NPU_compute_time (ms): min = .., max = .., mean = .., median = .., percentile(99%) = ..``; msame
  prints ``Inference average time: X ms``. Both summaries are parsed by the functions below.

What runs natively: the converted model computes in float16 on the AI Core's Cube unit (ATC's
default precision mode for inference; ``precision_mode`` option overrides it). Quantized ONNX
(QDQ) is not lowered here: int8 on Ascend goes through AMCT calibration, which this release does
not build, so ``stored_bits = native_bits = (32,)`` and 4/8-bit spaces are rejected up front.
Latency is the wall time of one ``InferSession.infer`` call (host-to-device copy, execution,
device-to-host copy), the time an application calling the model sees.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..errors import BackendError, MissingDependencyError
from .base import Artifact, Backend, LatencyStats, device_lock, parse_device, time_callables
from .onnxruntime import INPUT, export_onnx

OPTIONS = ("soc_version", "precision_mode", "atc_args", "timing")
ATC_HINT = "install the CANN toolkit and run `source /usr/local/Ascend/ascend-toolkit/set_env.sh`"
AIS_BENCH_HINT = "install the aclruntime and ais_bench wheels (ait benchmark) matching the CANN version"


# -- command lines and their output (pure functions: tested without the hardware) ---------------
def atc_command(
    onnx_path: Path,
    output_stem: Path,
    soc_version: str,
    input_shape: tuple[int, ...],
    *,
    input_name: str = INPUT,
    precision_mode: str | None = None,
    extra: tuple[str, ...] | list[str] = (),
) -> list[str]:
    """The ATC command converting our ONNX file to ``<output_stem>.om`` with a fixed input shape."""
    cmd = [
        "atc",
        "--framework=5",
        f"--model={onnx_path}",
        f"--output={output_stem}",
        f"--soc_version={soc_version}",
        f"--input_shape={input_name}:{','.join(str(int(d)) for d in input_shape)}",
    ]
    if len(input_shape) == 4:
        cmd.append("--input_format=NCHW")
    if precision_mode:
        cmd.append(f"--precision_mode={precision_mode}")
    cmd.append("--log=error")
    cmd.extend(extra)
    return cmd


_ERROR_LINE = re.compile(r"^\s*(E[A-Z0-9]{5}:.*|\[ERROR\].*)$", re.MULTILINE)


def check_atc_output(returncode: int, output: str) -> None:
    """Raise BackendError unless ATC reported success; the message carries ATC's error lines."""
    if returncode == 0 and "ATC run success" in output:
        return
    errors = [m.group(1).strip() for m in _ERROR_LINE.finditer(output)]
    detail = "; ".join(errors[:3]) if errors else (output.strip().splitlines() or ["no output"])[-1]
    raise BackendError(f"ATC conversion failed (exit code {returncode}): {detail}")


_SUMMARY = re.compile(
    r"(?P<what>\w+) \(ms\): min = (?P<min>[\d.eE+-]+), max = (?P<max>[\d.eE+-]+), "
    r"mean = (?P<mean>[\d.eE+-]+), median = (?P<median>[\d.eE+-]+), "
    r"percentile\((?P<pct>\d+)%\) = (?P<p>[\d.eE+-]+)"
)


def parse_ais_bench_summary(text: str) -> dict[str, dict[str, float]]:
    """``{"NPU_compute_time": {"min", "max", "mean", "median", "p99"}, "H2D_latency": ...}`` from
    ais_bench's "Performance Summary" lines (the last summary wins when there are several)."""
    out: dict[str, dict[str, float]] = {}
    for m in _SUMMARY.finditer(text):
        out[m.group("what")] = {
            "min": float(m.group("min")),
            "max": float(m.group("max")),
            "mean": float(m.group("mean")),
            "median": float(m.group("median")),
            f"p{m.group('pct')}": float(m.group("p")),
        }
    if "NPU_compute_time" not in out:
        raise BackendError("no 'NPU_compute_time (ms): ...' summary line in the ais_bench output")
    return out


def parse_msame_output(text: str) -> dict[str, float]:
    """msame's averages in ms: ``{"average_ms": .., "average_without_first_ms": ..}`` (where printed)."""
    out = {}
    for key, pattern in (
        ("average_without_first_ms", r"Inference average time without first time\s*:\s*([\d.]+)\s*ms"),
        ("average_ms", r"Inference average time\s*:\s*([\d.]+)\s*ms"),
    ):
        m = re.search(pattern, text)
        if m:
            out[key] = float(m.group(1))
    if not out:
        raise BackendError("no 'Inference average time' line in the msame output")
    return out


_NPU_SMI_VERSION = re.compile(r"npu-smi\s+\S+\s+Version:\s*(\S+)")
_NPU_SMI_CHIP = re.compile(
    r"^\|\s*(\d+)\s+([0-9A-Za-z_]+)\s*\|\s*(OK|Warning|Alarm|Critical|\w+)\s*\|", re.MULTILINE
)


def parse_npu_smi(text: str) -> dict:
    """Driver version and chips from ``npu-smi info``: ``{"driver": "23.0.6", "chips": [(0, "910B4")]}``."""
    m = _NPU_SMI_VERSION.search(text)
    chips = [(int(c.group(1)), c.group(2)) for c in _NPU_SMI_CHIP.finditer(text)]
    return {"driver": m.group(1) if m else None, "chips": chips}


def soc_version_for(npu_smi_text: str, device_index: int) -> str:
    """ATC's ``--soc_version`` for NPU ``device_index``: "Ascend" + its Name column (the documented rule
    for Atlas training/inference/A2 products; A3 needs ``npu-smi info -t board``: pass it explicitly)."""
    chips = parse_npu_smi(npu_smi_text)["chips"]
    if not chips:
        raise BackendError("npu-smi info lists no NPU; pass backend option soc_version (e.g. Ascend910B2)")
    names = dict(chips)
    name = names.get(device_index, chips[min(device_index, len(chips) - 1)][1])
    return name if name.startswith("Ascend") else f"Ascend{name}"


@functools.cache
def npu_smi_text() -> str:
    if shutil.which("npu-smi") is None:
        return ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        return subprocess.run(["npu-smi", "info"], capture_output=True, text=True, timeout=30).stdout
    return ""


def npu_smi_facts() -> dict:
    """Driver and chips of this machine's NPUs (empty when npu-smi is absent)."""
    text = npu_smi_text()
    return parse_npu_smi(text) if text else {}


def cann_version() -> str:
    """The CANN toolkit's version from its install info file (``unknown`` when not found)."""
    home = os.environ.get("ASCEND_TOOLKIT_HOME") or os.environ.get("ASCEND_HOME_PATH")
    if not home:
        return "unknown"
    for info in sorted(Path(home).glob("*/ascend_toolkit_install.info")) + [Path(home) / "version.cfg"]:
        with contextlib.suppress(OSError):
            m = re.search(r"version\s*=\s*\[?([\w.\-]+)", info.read_text(), re.IGNORECASE)
            if m:
                return m.group(1)
    return "unknown"


def _infer_session_cls():
    try:
        from ais_bench.infer.interface import InferSession
    except ImportError as exc:
        raise MissingDependencyError(f"ais_bench is not importable: {AIS_BENCH_HINT} ({exc})") from exc
    return InferSession


class AscendBackend(Backend):
    """CANN offline model (.om) on an Ascend NPU, converted by ATC, run by ais_bench."""

    name = "ascend"
    stored_bits = (32,)
    native_bits = (32,)  # computed in float16 on the Cube unit; int8 needs AMCT (not built)
    sparsity_kinds = ("unstructured",)
    preferred_channel_multiple = 16  # the Cube unit works on 16x16 fractal tiles (fp16)
    devices = ("npu:0",)
    artifact_suffix = ".om"

    @classmethod
    def unavailable_reason(cls, device: str) -> str | None:
        try:
            kind, _ = parse_device(device)
        except BackendError as exc:
            return str(exc)
        if kind != "npu":
            return f"the ascend backend runs on npu:N, not {device!r}"
        if shutil.which("atc") is None:
            return f"`atc` (CANN's model converter) is not on PATH: {ATC_HINT}"
        try:
            _infer_session_cls()
        except MissingDependencyError as exc:
            return str(exc)
        return None

    def __init__(self, device: str = "npu:0", batch_size: int = 1, threads: int = 1, **options):
        unknown = set(options) - set(OPTIONS)
        if unknown:
            raise BackendError(
                f"ascend backend: unknown option(s) {sorted(unknown)}; known: {', '.join(OPTIONS)}"
            )
        kind, idx = parse_device(device)
        if kind != "npu":
            raise BackendError(f"ascend backend: device {device!r} is not supported (npu:N)")
        reason = self.unavailable_reason(device)
        if reason:
            raise MissingDependencyError(f"ascend backend: {reason}")
        super().__init__(device, batch_size, threads, **options)
        self.device_id = idx
        self.soc_version = options.get("soc_version") or soc_version_for(npu_smi_text(), idx)
        self._sessions: dict[str, object] = {}

    # -- lowering -------------------------------------------------------------------------------
    def lower(self, model, example_inputs, precisions, out_dir, calibration=None, io=None) -> Artifact:
        bad = {k: b for k, b in precisions.items() if b not in self.stored_bits}
        if bad:
            raise BackendError(
                f"ascend backend lowers float models only (stored: 32); got bits for {sorted(bad)}"
            )
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        onnx_path = out_dir / "model.onnx"
        try:
            export_onnx(model, example_inputs, onnx_path, io=io)
        except Exception as exc:
            raise BackendError(f"torch.onnx.export failed: {type(exc).__name__}: {exc}") from exc
        shape = (self.batch_size, *example_inputs[0].shape[1:])
        with tempfile.TemporaryDirectory(prefix="ac-atc-") as tmp:
            cmd = atc_command(
                onnx_path,
                Path(tmp) / "model",
                self.soc_version,
                shape,
                precision_mode=self.options.get("precision_mode"),
                extra=tuple(self.options.get("atc_args", ())),
            )
            proc = subprocess.run(cmd, capture_output=True, text=True)
            check_atc_output(proc.returncode, proc.stdout + proc.stderr)
            target = out_dir / "model.om"
            shutil.move(str(Path(tmp) / "model.om"), target)
        params = sum(p.numel() for p in model.parameters())
        return Artifact(
            path=target,
            backend=self.name,
            device=self.device,
            size_bytes=target.stat().st_size,
            packed_size_bytes=int(params * 4),
            precisions=dict(precisions),
            meta={"soc_version": self.soc_version, "input_shape": list(shape), "source": onnx_path.name},
        )

    # -- running --------------------------------------------------------------------------------
    def session(self, path: Path):
        key = str(Path(path).resolve())
        if key not in self._sessions:
            self._sessions[key] = _infer_session_cls()(self.device_id, key)
        return self._sessions[key]

    def _static_batches(self, inputs: np.ndarray):
        """The model has a fixed batch: feed chunks of ``batch_size``, the last one padded."""
        b = self.batch_size
        for i in range(0, len(inputs), b):
            chunk = inputs[i : i + b]
            n = len(chunk)
            if n < b:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], b - n, axis=0)])
            dtype = np.float32 if np.issubdtype(chunk.dtype, np.floating) else chunk.dtype
            yield np.ascontiguousarray(chunk, dtype=dtype), n

    def runner(self, artifact: Artifact):
        """The .om has a fixed batch: each batch is fed in padded chunks of ``batch_size``."""
        sess = self.session(artifact.path)

        def run(inputs: tuple[np.ndarray, ...]) -> np.ndarray:
            chunks = [list(self._static_batches(x)) for x in inputs]
            outs = []
            for parts in zip(*chunks, strict=True):
                n = parts[0][1]
                outs.append(np.asarray(sess.infer([p[0] for p in parts], mode="static")[0])[:n])
            return np.concatenate(outs).astype(np.float32)

        return run

    def _time(self, artifacts: list[Artifact], example_inputs) -> list[LatencyStats]:
        x = next(self._static_batches(example_inputs[0].numpy()))[0]
        sessions = [self.session(a.path) for a in artifacts]
        with device_lock(self.device):
            fns = [lambda s=s: s.infer([x], mode="static") for s in sessions]
            return time_callables(
                fns, device=self.device, batch_size=self.batch_size, **self.options.get("timing", {})
            )

    def measure(self, artifact: Artifact, example_inputs) -> LatencyStats:
        return self._time([artifact], example_inputs)[0]

    def measure_pair(self, artifact: Artifact, reference: Artifact, example_inputs):
        a, b = self._time([artifact, reference], example_inputs)
        return a, b

    def close(self) -> None:
        sessions, self._sessions = self._sessions, {}
        for s in sessions.values():
            with contextlib.suppress(Exception):
                s.free_resource()

    # -- facts ----------------------------------------------------------------------------------
    def fingerprint(self, artifact: Artifact) -> str | None:
        """The source ONNX's structure (written beside the .om) plus the ATC settings."""
        from .base import stable_hash
        from .cache import onnx_fingerprint

        source = artifact.path.with_suffix(".onnx")
        if not source.exists():
            return None
        settings = [
            self.soc_version,
            self.options.get("precision_mode"),
            list(self.options.get("atc_args", ())),
        ]
        return stable_hash([onnx_fingerprint(source), settings])

    def example_inputs_for(self, artifact: Artifact) -> tuple[torch.Tensor, ...]:
        shapes = [list(i.shape) for i in self.session(artifact.path).get_inputs()]
        return tuple(torch.zeros([max(1, int(d)) for d in s]) for s in shapes)

    def load_artifact(self, path: Path) -> Artifact:
        art = super().load_artifact(path)
        if Path(path).suffix != ".om":
            raise BackendError(f"ascend backend: {path} is not an .om file")
        return art

    def versions(self) -> dict[str, str]:
        v = {**super().versions(), "cann": cann_version()}
        with contextlib.suppress(Exception):
            import ais_bench

            v["ais_bench"] = getattr(ais_bench, "__version__", "unknown")
        return v

    def device_info(self) -> dict:
        facts = npu_smi_facts()
        chips = dict(facts.get("chips", []))
        return {
            "name": chips.get(self.device_id, self.soc_version),
            "count": len(chips) or None,
            "driver": facts.get("driver"),
        }
