"""The peers of ``benchmarks/peers.py``: other tools' answers to "make this float ONNX model faster".

Each peer takes a :class:`PeerInput` (the un-optimized float ONNX export of the study's teacher, the
study's calibration samples, the eval split as single samples for accuracy-aware tools, a scorer) and
returns a :class:`PeerResult`: the artifact it wrote and the wall time it took to get there, or why it
did not run (``not installed``: the package cannot be imported; ``failed``: it raised, with the exact
error). Nothing here times or scores the artifacts: the benchmark does that for every row alike, with
the study's backend.

Peers (their packages are extras of the benchmark: ``pip install -e ".[peers]"``):

* ``ort_dynamic``: ONNX Runtime ``quant_pre_process`` + ``quantize_dynamic`` (int8 weights, per tensor);
* ``ort_static``: ``quant_pre_process`` + ``quantize_static`` (QDQ, per-channel int8 weights, uint8
  activations, min-max calibration);
* ``nncf_quantize``: NNCF's ``nncf.quantize`` on the ONNX model (its default preset);
* ``nncf_ac``: NNCF's ``nncf.quantize_with_accuracy_control`` (``max_drop`` in the study's terms);
* ``olive``: Olive's CPU post-training quantization workflow (an ``ONNXModel`` input and its
  ``OnnxStaticQuantization`` pass with Olive's defaults, run by ``olive.workflows.run``).

``reduce_range`` (7-bit weights) is passed to the ORT quantizers where the CPU has no VNNI: ORT's own
advice for such CPUs, and what the project's backend does too.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shutil
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from autocompress.backends.ort_fusions import quiet as ort_quiet

PEERS = ("ort_dynamic", "ort_static", "nncf_quantize", "nncf_ac", "olive")
Sample = tuple[tuple[np.ndarray, ...], np.ndarray | None, np.ndarray | None]  # inputs, target, reference


@dataclass
class PeerInput:
    """What every peer is given: the same model and data.

    Attributes:
        float_onnx: the float ONNX export the study's baseline came from (before ORT's optimizations).
        names: the graph's fed inputs, in order.
        calibration: the study's calibration samples, one array per input.
        samples: the eval split as single samples ``(inputs, target, teacher output)`` (accuracy control).
        score_samples: ``fn(onnx_path, samples) -> (metric, per-sample metric)`` with the task's metric.
        sign: +1 when a higher metric is better, -1 when lower is.
        reduce_range: 7-bit weights for ORT's quantizers (the CPU has no VNNI).
        transformer: the graph is a transformer (NNCF's ``model_type`` for it).
        max_drop / drop_kind: the accuracy budget of accuracy-aware peers, ``abs`` or ``rel``.
        workdir: where each peer writes ``<peer>/model.onnx``.
    """

    float_onnx: Path
    names: list[str]
    calibration: tuple[np.ndarray, ...]
    samples: list[Sample]
    score_samples: Callable[[Path, list[Sample]], tuple[float, list[float]]]
    sign: int = 1
    reduce_range: bool = False
    transformer: bool = False
    max_drop: float = 0.01
    drop_kind: str = "abs"
    workdir: Path = Path(".")

    def calibration_feeds(self, batch: int = 1) -> list[dict[str, np.ndarray]]:
        n = len(self.calibration[0])
        return [
            {
                k: np.ascontiguousarray(a[i : i + batch])
                for k, a in zip(self.names, self.calibration, strict=True)
            }
            for i in range(0, n, batch)
        ]


@dataclass
class PeerResult:
    name: str
    tool: str
    status: str  # ok | not installed | failed | skipped
    reason: str = ""
    path: Path | None = None
    wall_s: float | None = None
    settings: str = ""
    extra: dict = field(default_factory=dict)


class _Reader:
    """An ORT ``CalibrationDataReader`` over prepared feeds (one dict per batch)."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self._feeds = feeds
        self._it = iter(feeds)

    def get_next(self):
        return next(self._it, None)

    def rewind(self):
        self._it = iter(self._feeds)


def quiet():
    """Tools' progress bars and INFO logs off (their warnings and errors still reach the log file)."""
    return ort_quiet("nncf", "olive")


def error_line(exc: BaseException) -> str:
    """``Type: first line`` of an exception, as the table shows it."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip()[:300]


def missing(module: str, pip: str) -> str | None:
    """Why ``module`` cannot be imported (the exact error, with the install line), or None."""
    try:
        importlib.import_module(module)
    except Exception as exc:  # ImportError, or a broken install raising something else
        return f'{error_line(exc)} (pip install {pip}, or the benchmark\'s extra: pip install -e ".[peers]")'
    return None


def _preprocessed(inp: PeerInput, out: Path) -> tuple[Path, str]:
    """ORT's ``quant_pre_process`` (shape inference, ORT's basic optimizations) of the float model, written
    beside ``out`` (each ORT peer runs it: it is part of that peer's wall time), and how it went.

    Where ORT's symbolic shape inference gives up (it does on the BERT exports here: "Incomplete symbolic
    shape inference"), it runs again without it (``skip_symbolic_shape=True``, the pre-processor's own
    option for that); the row's settings say so."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre, src = out.with_name("preprocessed.onnx").resolve(), inp.float_onnx.resolve()
    # where symbolic shape inference fails it dumps its model (and external data) into the working folder
    with contextlib.chdir(out.parent):
        try:
            with quiet():
                quant_pre_process(str(src), str(pre))
            return pre, "quant_pre_process"
        except Exception as exc:
            first = exc
        with quiet():
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        for debris in [Path("sym_shape_infer_temp.onnx"), *Path(".").glob("*.data")]:
            debris.unlink(missing_ok=True)  # that dump, in this peer's own folder
    return pre, f"quant_pre_process(skip_symbolic_shape=True; with it: {error_line(first)})"


def ort_dynamic(inp: PeerInput, out: Path) -> str:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    pre, how = _preprocessed(inp, out)
    with quiet():
        quantize_dynamic(str(pre), str(out), weight_type=QuantType.QInt8, reduce_range=inp.reduce_range)
    return f"{how} + quantize_dynamic(QInt8, per-tensor, reduce_range={inp.reduce_range})"


def ort_static(inp: PeerInput, out: Path) -> str:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    pre, how = _preprocessed(inp, out)
    with quiet():
        quantize_static(
            str(pre),
            str(out),
            _Reader(inp.calibration_feeds(32)),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=inp.reduce_range,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
    return (
        f"{how} + quantize_static(QDQ, per-channel QInt8 weights, QUInt8 activations, MinMax, "
        f"reduce_range={inp.reduce_range}, {len(inp.calibration[0])} calibration samples)"
    )


def _nncf_common(inp: PeerInput):
    import nncf

    kwargs = {"subset_size": len(inp.calibration[0])}
    if inp.transformer:
        kwargs["model_type"] = nncf.ModelType.TRANSFORMER
    return nncf, nncf.Dataset(inp.calibration_feeds(1)), kwargs


def nncf_quantize(inp: PeerInput, out: Path) -> str:
    nncf, calibration, kwargs = _nncf_common(inp)
    with quiet():
        model = nncf.quantize(onnx.load(str(inp.float_onnx)), calibration, **kwargs)
    onnx.save(model, str(out))
    kind = ", model_type=TRANSFORMER" if inp.transformer else ""
    return f"nncf.quantize(default preset{kind}, {kwargs['subset_size']} calibration samples)"


def nncf_ac(inp: PeerInput, out: Path) -> str:
    nncf, calibration, kwargs = _nncf_common(inp)
    scratch = inp.workdir / "nncf_ac_eval.onnx"
    calls = {"n": 0}
    sign = inp.sign

    def validate(model: onnx.ModelProto, items) -> tuple[float, list[float]]:
        calls["n"] += 1
        onnx.save(model, str(scratch))
        metric, per_item = inp.score_samples(scratch, list(items))
        return sign * metric, [sign * v for v in per_item]  # NNCF maximizes: a lower-is-better metric flips

    drop_type = nncf.DropType.RELATIVE if inp.drop_kind == "rel" else nncf.DropType.ABSOLUTE
    with quiet():
        model = nncf.quantize_with_accuracy_control(
            onnx.load(str(inp.float_onnx)),
            calibration,
            nncf.Dataset(inp.samples),
            validate,
            max_drop=inp.max_drop,
            drop_type=drop_type,
            **kwargs,
        )
    onnx.save(model, str(out))
    scratch.unlink(missing_ok=True)
    kind = ", model_type=TRANSFORMER" if inp.transformer else ""
    return (
        f"nncf.quantize_with_accuracy_control(max_drop={inp.max_drop:g} {drop_type.name.lower()}{kind}, "
        f"validated on the {len(inp.samples)} eval samples, {calls['n']} validation passes)"
    )


def olive(inp: PeerInput, out: Path) -> str:
    os.environ.setdefault("OLIVE_DISABLE_TELEMETRY", "1")  # offline: nothing to send it to
    from olive.data.registry import Registry
    from olive.workflows import run as olive_run

    feeds = inp.calibration_feeds(1)

    @Registry.register_dataloader("autocompress_peers_calibration")
    def _calibration_loader(dataset, **kwargs):  # noqa: ARG001 - Olive's dataloader signature
        import torch

        return [({k: torch.from_numpy(v) for k, v in f.items()}, None) for f in feeds]

    folder = out.parent / "workflow"
    shutil.rmtree(folder, ignore_errors=True)  # Olive caches pass outputs: a rerun must not time the cache
    config = {
        "input_model": {"type": "ONNXModel", "model_path": str(inp.float_onnx)},
        "systems": {
            "local_system": {
                "type": "LocalSystem",
                "accelerators": [{"device": "cpu", "execution_providers": ["CPUExecutionProvider"]}],
            }
        },
        "data_configs": [
            {
                "name": "calibration",
                "type": "DataContainer",
                "dataloader_config": {"type": "autocompress_peers_calibration"},
            }
        ],
        "passes": {"quantization": {"type": "OnnxStaticQuantization", "data_config": "calibration"}},
        "host": "local_system",
        "target": "local_system",
        "cache_dir": str(folder / "cache"),
        "output_dir": str(folder / "output"),
        "log_severity_level": 3,
    }
    with quiet():
        result = olive_run(config)
    model = _olive_output_model(result, folder / "output")
    onnx.save(onnx.load(str(model)), str(out))
    return "olive.workflows.run: ONNXModel -> OnnxStaticQuantization (Olive's defaults: QDQ, int8, MinMax)"


def _olive_output_model(result, folder: Path) -> Path:
    """The ONNX file of the workflow's best (only) output model."""
    best = getattr(result, "get_best_candidate", lambda: None)() if result is not None else None
    path = getattr(best, "model_path", None) if best is not None else None
    if path and Path(path).is_file():
        return Path(path)
    if path and Path(path).is_dir():
        found = sorted(Path(path).rglob("*.onnx"))
        if found:
            return found[0]
    found = sorted(folder.rglob("*.onnx"))
    if not found:
        raise RuntimeError(f"Olive's workflow wrote no ONNX model under {folder}")
    return found[0]


RUNNERS = {
    "ort_dynamic": ("onnxruntime", "onnxruntime", ort_dynamic),
    "ort_static": ("onnxruntime", "onnxruntime", ort_static),
    "nncf_quantize": ("nncf", "nncf", nncf_quantize),
    "nncf_ac": ("nncf", "nncf", nncf_ac),
    "olive": ("olive", "olive-ai", olive),
}
LABELS = {
    "ort_dynamic": "ORT quantize_dynamic",
    "ort_static": "ORT quantize_static (QDQ, per-channel)",
    "nncf_quantize": "NNCF nncf.quantize",
    "nncf_ac": "NNCF quantize_with_accuracy_control",
    "olive": "Olive CPU PTQ workflow",
}


def run_peer(name: str, inp: PeerInput, log: Callable[[str], None] = print) -> PeerResult:
    """One peer's answer, or the row saying why there is none (never raises for the peer's own errors)."""
    module, pip, fn = RUNNERS[name]
    tool = f"{pip} {_version(module)}".strip()
    reason = missing(module, pip)
    if reason is not None:
        return PeerResult(name, pip, "not installed", reason)
    folder = inp.workdir / name
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / "model.onnx"
    for old in (out, folder / "error.txt"):
        old.unlink(missing_ok=True)
    t0 = time.perf_counter()
    try:
        settings = fn(inp, out)
    except Exception as exc:
        log(f"  {name} failed: {error_line(exc)}")
        (folder / "error.txt").write_text(traceback.format_exc())
        return PeerResult(name, tool, "failed", error_line(exc), wall_s=time.perf_counter() - t0)
    wall = time.perf_counter() - t0
    return PeerResult(name, tool, "ok", path=out, wall_s=wall, settings=settings)


def _version(module: str) -> str:
    with contextlib.suppress(Exception):
        from importlib.metadata import version

        return version({"olive": "olive-ai"}.get(module, module))
    return ""
