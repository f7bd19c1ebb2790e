"""Ascend NPU backend: the project's ONNX -> (AMCT for int8 layers) -> ATC offline model (.om),
evaluated and timed through ais_bench's ``InferSession``.

Lowering (what runs where is written into each artifact's ``meta``):
* 8-bit layers: the project's QDQ int8 ONNX with the trained integers and scales (made by the
  onnxruntime backend's lowering, full 8-bit grid) is checked against AMCT's documented QAT rules
  (:mod:`.amct`), then ``amct_onnx.convert_qat_model`` writes a deploy model (ATC's input) and a
  fake-quant model, kept beside the .om as ``model_fake_quant.onnx`` for accuracy checks on the CPU.
* 16-bit layers and everything that is not an int8 layer: fp16 (``--precision_mode=force_fp16``).
* 32-bit layers: kept in fp32 by listing their nodes in ``--keep_dtype`` (not silently cast).
* The baseline (every layer float): fp16 throughout, the fastest float artifact ATC makes.
Linear layers (Gemm / MatMul) are quantized per tensor on this backend (``weight_granularity``): AMCT
adapts only per-tensor weights there; the search space does not ask for anything else.

ais_bench interface API guide (read, not copied): ``InferSession(device_id, model_path)``;
``session.infer(feeds, mode="static")`` returns numpy outputs; ``session.summary().exec_time_list``
(``sumary()`` in older releases) holds the execution time of each call in ms, which is what is timed
by default (option ``latency: compute``; ``wall`` times the whole ``infer`` call, copies included).
Accuracy is that of the .om on the NPU by default (option ``evaluate_on: cpu``: the fake-quant model on
ONNX Runtime's CPU provider instead).
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from pathlib import Path

import numpy as np
import torch

from ..errors import BackendError, MissingDependencyError
from ..lowering import LoweringSpec
from ..scratch import scratch_dir
from .ascend_cann import (
    AIS_BENCH_HINT,
    ATC_HINT,
    ais_bench_command,
    atc_command,
    atc_precision,
    cann_version,
    check_atc_output,
    keep_dtype_nodes,
    parse_ais_bench_summary,
    parse_msame_output,
    soc_version_for,
)
from .base import Artifact, Backend, LatencyStats, device_lock, parse_device, time_callables, wrong_device
from .device_facts import npu_smi_facts, npu_smi_text, parse_npu_smi
from .onnx_export import export_onnx
from .timing import TimedInRounds

__all__ = [
    "AscendBackend",
    "ais_bench_command",
    "atc_command",
    "atc_precision",
    "build_atc_input",
    "check_atc_output",
    "keep_dtype_nodes",
    "measured_on",
    "parse_ais_bench_summary",
    "parse_msame_output",
    "parse_npu_smi",
    "soc_version_for",
]

OPTIONS = ("soc_version", "precision_mode", "atc_args", "timing", "evaluate_on", "latency")
EVALUATE_ON = ("npu", "cpu")  # accuracy of the .om on the NPU, or of the fake-quant ONNX on the CPU
LATENCIES = ("compute", "wall")  # ais_bench's execution time per call, or the wall time of infer()
# per layer kind: the weight grids AMCT adapts (Conv / ConvTranspose: per channel or per tensor;
# Gemm and single-input MatMul, i.e. Linear: per tensor only)
WEIGHT_GRANULARITY = {"Conv1d": ("channel", "tensor"), "Conv2d": ("channel", "tensor"), "Linear": ("tensor",)}


# -- command lines and their output (pure functions: tested without the hardware) ---------------
def float_tables_apart(model, spec: LoweringSpec) -> LoweringSpec:
    """The spec without the embedding tables it keeps float: a lookup is no compute node for
    ``--keep_dtype`` and follows the precision mode, as before tables were layers. This backend stores
    tables in float only (``bits_by_kind``); a table planned below float is refused."""
    tables = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Embedding)}
    low = sorted(n for n, lay in spec.layers.items() if n in tables and lay.bits < 32)
    if low:
        raise BackendError(
            f"ascend backend: {', '.join(map(repr, low))} are embedding tables, stored in float only "
            "on this backend; keep them at bits 32"
        )
    return spec.only(n for n in spec.layers if n not in tables)


def build_atc_input(model, example_inputs, spec, out_dir: Path, calibration=None, amct=None, io=None) -> dict:
    """Write what ATC converts, in ``out_dir``, and return its paths.

    Float plans: ``model.onnx`` (exported as the onnxruntime backend does) is ATC's input. Plans with
    8-bit layers: ``model.onnx`` is the project's QDQ int8 ONNX (trained integers), checked against AMCT's
    rules; ``amct_onnx.convert_qat_model`` turns it into ``model_deploy.onnx`` (ATC's input) and
    ``model_fake_quant.onnx`` (kept beside the .om for accuracy checks on the CPU).

    Returns:
        ``{"source", "atc_input", "fake_quant" (None for float plans)}``.
    """
    from .amct import convert_qat, qdq_for_amct

    spec = LoweringSpec.coerce(spec)
    atc_precision(spec.layer_bits())  # refuses bits the backend does not store
    out_dir.mkdir(parents=True, exist_ok=True)
    source = out_dir / "model.onnx"
    int8 = spec.only(k for k, b in spec.layer_bits().items() if b == 8)
    if not int8:
        try:
            export_onnx(model, example_inputs, source, io=io)
        except Exception as exc:
            raise BackendError(f"torch.onnx.export failed: {type(exc).__name__}: {exc}") from exc
        return {"source": source, "atc_input": source, "fake_quant": None}
    if calibration is None:
        raise BackendError("ascend backend: int8 layers need calibration inputs")
    qdq_for_amct(model, example_inputs, int8, source, calibration, io=io)
    with scratch_dir("ac-amct-") as tmp:
        fake, deploy = convert_qat(source, Path(tmp) / "model", amct=amct)
        shutil.move(str(fake), out_dir / "model_fake_quant.onnx")
        shutil.move(str(deploy), out_dir / "model_deploy.onnx")
    return {
        "source": source,
        "atc_input": out_dir / "model_deploy.onnx",
        "fake_quant": out_dir / "model_fake_quant.onnx",
    }


def _infer_session_cls():
    try:
        from ais_bench.infer.interface import InferSession
    except ImportError as exc:
        raise MissingDependencyError(f"ais_bench is not importable: {AIS_BENCH_HINT} ({exc})") from exc
    return InferSession


def measured_on(device: str, options: dict, quantized: bool) -> dict[str, str]:
    """What an artifact's accuracy and latency are measured on, for its report (``meta["measured"]``)."""
    if options.get("evaluate_on", "npu") == "cpu":
        model = "model_fake_quant.onnx (AMCT's fake-quant model)" if quantized else "model.onnx (fp32)"
        metric = f"{model} on the CPU (onnxruntime), not the .om"
    else:
        metric = f"model.om on {device} (ais_bench InferSession)"
    if options.get("latency", "compute") == "compute":
        latency = f"model.om on {device}: ais_bench's execution time per call (exec_time_list)"
    else:
        latency = f"model.om on {device}: wall time of InferSession.infer (host-device copies included)"
    return {"metric": metric, "latency": latency}


def _exec_ms(entry) -> float:
    """One ``exec_time_list`` entry in ms: a number, or a (start, end) pair in ms."""
    if isinstance(entry, list | tuple):
        return float(entry[-1]) - float(entry[0])
    return float(entry)


class _NpuCall:
    """One ``InferSession.infer`` call; ``compute_s`` also reads the NPU time ais_bench recorded for it."""

    def __init__(self, session, x: np.ndarray):
        self.session, self.x = session, x

    def __call__(self):
        return self.session.infer([self.x], mode="static")

    def compute_s(self) -> float:
        self()
        summary = getattr(self.session, "summary", None) or self.session.sumary  # older ais_bench: sumary
        times = summary().exec_time_list
        if not times:
            raise BackendError("ais_bench recorded no execution time for the call (exec_time_list empty)")
        return _exec_ms(times[-1]) / 1e3


class AscendBackend(TimedInRounds, Backend):
    """CANN offline model (.om) on an Ascend NPU: int8 layers through AMCT, then ATC; run by ais_bench."""

    name = "ascend"
    artifact_suffix = ".om"
    stored_bits = (8, 16, 32)
    native_bits = (8, 16, 32)  # int8 and fp16 on the Cube unit; 32: kept in fp32 through --keep_dtype
    # per operator type: which weight grids AMCT adapts (Gemm / MatMul: per tensor only)
    weight_granularity = WEIGHT_GRANULARITY
    sparsity_kinds = ("unstructured",)
    preferred_channel_multiple = 16  # the Cube unit works on 16x16 fractal tiles (fp16)
    devices = ("npu:0",)

    @classmethod
    def capabilities(cls) -> dict:
        return {
            **super().capabilities(),
            "weight_granularity": {k: list(v) for k, v in WEIGHT_GRANULARITY.items()},
        }

    @classmethod
    def unavailable_reason(cls, device: str) -> str | None:
        reason = wrong_device(device, "npu", f"the ascend backend runs on npu:N, not {device!r}")
        if reason:
            return reason
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
        for key, allowed in (("evaluate_on", EVALUATE_ON), ("latency", LATENCIES)):
            if key in options and options[key] not in allowed:
                raise BackendError(
                    f"ascend backend: option {key}: {options[key]!r} is not one of {list(allowed)}"
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
    def lower(self, model, example_inputs, spec, out_dir, calibration=None, io=None) -> Artifact:
        spec = float_tables_apart(model, LoweringSpec.coerce(spec))
        layer_bits = spec.layer_bits()
        out_dir = Path(out_dir)
        src = build_atc_input(model, example_inputs, spec, out_dir, calibration, io=io)
        shape = (self.batch_size, *example_inputs[0].shape[1:])
        mode, keep = atc_precision(layer_bits, self.options.get("precision_mode"))
        keep_nodes = keep_dtype_nodes(src["atc_input"], keep)
        with scratch_dir("ac-atc-") as tmp:
            keep_file = None
            if keep_nodes:
                keep_file = out_dir / "keep_dtype.cfg"
                keep_file.write_text("\n".join(keep_nodes) + "\n")
            cmd = atc_command(
                src["atc_input"],
                Path(tmp) / "model",
                self.soc_version,
                shape,
                precision_mode=mode,
                keep_dtype=keep_file,
                extra=tuple(self.options.get("atc_args", ())),
            )
            proc = subprocess.run(cmd, capture_output=True, text=True)
            check_atc_output(proc.returncode, proc.stdout + proc.stderr)
            target = out_dir / "model.om"
            shutil.move(str(Path(tmp) / "model.om"), target)
        packed = sum(
            p.numel() * (layer_bits.get(n.rpartition(".")[0], 32) if n.endswith("weight") else 32) / 8
            for n, p in model.named_parameters()
        )
        meta = {
            "soc_version": self.soc_version,
            "input_shape": list(shape),
            "source": "model.onnx",
            "atc_input": src["atc_input"].name,
            "fake_quant": src["fake_quant"].name if src["fake_quant"] else None,
            "precision_mode": mode,
            "keep_fp32": keep_nodes,
            "measured": measured_on(self.device, self.options, src["fake_quant"] is not None),
        }
        return self.artifact_at(
            target,
            packed,
            dict(layer_bits),
            meta,
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
        """The .om has a fixed batch: each batch is fed in padded chunks of ``batch_size``. With
        ``evaluate_on: cpu``, the fake-quant model AMCT wrote beside the .om (or the float ONNX) runs
        on ONNX Runtime's CPU instead."""
        if self.options.get("evaluate_on", "npu") == "cpu":
            return self._cpu_runner(artifact)
        sess = self.session(artifact.path)

        def run(inputs: tuple[np.ndarray, ...]) -> np.ndarray:
            chunks = [list(self._static_batches(x)) for x in inputs]
            outs = []
            for parts in zip(*chunks, strict=True):
                n = parts[0][1]
                outs.append(np.asarray(sess.infer([p[0] for p in parts], mode="static")[0])[:n])
            return np.concatenate(outs).astype(np.float32)

        return run

    def _cpu_runner(self, artifact: Artifact):
        from .ort_session import make_session

        name = artifact.meta.get("fake_quant") or "model.onnx"
        sess = make_session(artifact.path.parent / name, self.threads)
        names = [i.name for i in sess.get_inputs()]

        def run(inputs: tuple[np.ndarray, ...]) -> np.ndarray:
            return np.asarray(sess.run(None, dict(zip(names, inputs, strict=True)))[0], dtype=np.float32)

        return run

    def _time(self, artifacts: list[Artifact], example_inputs) -> list[LatencyStats]:
        x = next(self._static_batches(example_inputs[0].numpy()))[0]
        sessions = [self.session(a.path) for a in artifacts]
        with device_lock(self.device):
            calls = [_NpuCall(s, x) for s in sessions]
            timer = (lambda c: c.compute_s()) if self.options.get("latency", "compute") == "compute" else None
            return time_callables(
                calls,
                device=self.device,
                batch_size=self.batch_size,
                timer=timer,
                **self.options.get("timing", {}),
            )

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
        settings = [  # the precision mode and the layers kept in fp32 change the kernels, not the ONNX
            self.soc_version,
            artifact.meta.get("precision_mode", self.options.get("precision_mode")),
            artifact.meta.get("keep_fp32", []),
            list(self.options.get("atc_args", ())),
        ]
        return stable_hash([onnx_fingerprint(source), settings])

    def example_inputs_for(self, artifact: Artifact) -> tuple[torch.Tensor, ...]:
        shapes = [list(i.shape) for i in self.session(artifact.path).get_inputs()]
        return tuple(torch.zeros([max(1, int(d)) for d in s]) for s in shapes)

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
