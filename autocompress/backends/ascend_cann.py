"""CANN's command-line tools for the ascend backend: the ATC command line and its verdict, the
ais_bench / msame summaries, ``npu-smi info`` and the toolkit's version. Pure functions of text
(tested without the hardware), plus the two calls that read this machine (``npu-smi``, install info).

Documentation followed (read, not copied):
* CANN graph developer guide, "Converting an ONNX Model Using ATC Commands" (hiascend.com):
  ``atc --model=<x.onnx> --framework=5 --output=<dir/name> --soc_version=<Ascend + the Name column
  of npu-smi info>``; ``--input_shape="<input>:N,C,H,W"`` fixes the batch axis; ``--output`` names
  the file without its ``.om`` suffix; ``--precision_mode`` (``force_fp16`` is the inference default)
  and ``--keep_dtype=<file>`` (one operator name per line: those operators keep their original
  precision, used with ``--precision_mode``). ATC prints ``ATC run success, welcome to the next use.``
  on success and ``ATC run failed, Please check the detail log, ...`` followed by error-code lines
  (``E10001: ...``, ``EZ3003: ...``) on failure.
* ait benchmark (ais_bench): its command line prints ``NPU_compute_time (ms): min = .., max = ..,
  mean = .., median = .., percentile(99%) = ..``; msame prints ``Inference average time: X ms``.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

from ..errors import BackendError
from .device_facts import parse_npu_smi
from .onnx_export import INPUT

FP16_MODE = "force_fp16"  # ATC's inference default: float layers on the Cube unit in fp16

ATC_HINT = "install the CANN toolkit and run `source /usr/local/Ascend/ascend-toolkit/set_env.sh`"
AIS_BENCH_HINT = "install the aclruntime and ais_bench wheels (ait benchmark) matching the CANN version"


def atc_command(
    onnx_path: Path,
    output_stem: Path,
    soc_version: str,
    input_shape: tuple[int, ...],
    *,
    input_name: str = INPUT,
    precision_mode: str | None = None,
    keep_dtype: Path | None = None,
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
    if keep_dtype is not None:
        cmd.append(f"--keep_dtype={keep_dtype}")
    cmd.append("--log=error")
    cmd.extend(extra)
    return cmd


def ais_bench_command(om_path: Path, device_id: int, loop: int = 100, warmup: int = 10) -> list[str]:
    """ais_bench's pure-inference run of an .om (no --input: it feeds generated data); its output ends
    with the "Performance Summary" that :func:`parse_ais_bench_summary` reads."""
    return [
        "python3",
        "-m",
        "ais_bench",
        f"--model={om_path}",
        f"--device={device_id}",
        f"--loop={loop}",
        f"--warmup_count={warmup}",
    ]


def atc_precision(layer_bits: dict[str, int], precision_mode: str | None = None) -> tuple[str, list[str]]:
    """ATC's ``--precision_mode`` and the layers to keep in fp32 (``--keep_dtype``) for a plan.

    8- and 16-bit layers and the rest of the graph run in fp16 (``force_fp16``, ATC's inference default);
    a layer the plan keeps at 32 bits is listed for ``--keep_dtype``, so it is not silently cast to fp16.
    The baseline (every layer float) is the fastest float artifact: fp16 throughout. A ``precision_mode``
    option replaces the global mode; with ``must_keep_origin_dtype`` everything float stays fp32 anyway.
    """
    mode = precision_mode or FP16_MODE
    bad = {k: b for k, b in layer_bits.items() if b not in (8, 16, 32)}
    if bad:
        raise BackendError(
            f"ascend backend: bits {sorted(set(bad.values()))} not in (8, 16, 32) for {sorted(bad)}"
        )
    keep = [] if mode == "must_keep_origin_dtype" else sorted(k for k, b in layer_bits.items() if b == 32)
    return mode, keep


def keep_dtype_nodes(onnx_path: Path, layers: list[str]) -> list[str]:
    """Names of the ONNX compute nodes of ``layers`` (torch module paths), for ATC's ``--keep_dtype``.

    A node belongs to layer ``a.b`` when the exporter scoped it ``/a/a.b/...`` or it reads ``a.b.weight``.
    """
    if not layers:
        return []
    import onnx

    from .amct import WEIGHT_OPS

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    out = []
    for layer in layers:
        parts = layer.split(".")
        scope = "/" + "/".join(".".join(parts[: i + 1]) for i in range(len(parts))) + "/"
        weights = {f"{layer}.weight", f"{layer}.weight_quantized"}
        found = [
            n.name
            for n in graph.node
            if n.op_type in WEIGHT_OPS and (n.name.startswith(scope) or weights & set(n.input))
        ]
        if not found:
            raise BackendError(
                f"ascend backend: cannot find the ONNX node of layer {layer!r} in {onnx_path.name} "
                "to keep it in fp32 (--keep_dtype)"
            )
        out += found
    return out


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


def soc_version_for(npu_smi_text: str, device_index: int) -> str:
    """ATC's ``--soc_version`` for NPU ``device_index``: "Ascend" + its Name column (the documented rule
    for Atlas training/inference/A2 products; A3 needs ``npu-smi info -t board``: pass it explicitly)."""
    chips = parse_npu_smi(npu_smi_text)["chips"]
    if not chips:
        raise BackendError("npu-smi info lists no NPU; pass backend option soc_version (e.g. Ascend910B2)")
    names = dict(chips)
    name = names.get(device_index, chips[min(device_index, len(chips) - 1)][1])
    return name if name.startswith("Ascend") else f"Ascend{name}"


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
