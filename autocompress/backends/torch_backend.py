"""Eager PyTorch backend: the compressed model itself, run by torch on ``cpu``, ``cuda:N`` or ``npu:N``.

The artifact is a ``torch.export`` program (``model.pt2``: the graph as JSON plus raw weight bytes,
with a dynamic batch axis). It is loaded without unpickling anything: the archive is refused if any
payload is pickled, and ``torch.export.load`` runs with ``TORCH_FORCE_WEIGHTS_ONLY_LOAD=1``.

What it stores and runs: float weights only (``stored_bits = native_bits = (32,)``). A QAT plan's
integers would be kept as floats on their grid, which is neither smaller nor faster in eager torch,
so the study validation rejects 4/8-bit spaces for this backend instead of pretending. The ``dtype``
option (``float16`` / ``bfloat16``) exports and runs the whole model in that precision where the
device runs it natively (CUDA; NPU; CPUs with AVX512-FP16/BF16 or AMX), and is refused elsewhere.

Devices and timing:
* ``cpu``: wall clock around each call, in a clean worker process by default (``isolate``), pinned to
  the cores of option ``pin_core`` (an int or a list).
* ``cuda:N``: CUDA events around each call (``torch.cuda.Event(enable_timing=True)``), i.e. device time.
* ``npu:N``: the Ascend adapter ``torch_npu`` is imported only here. Followed: torch_npu's API reference
  on hiascend.com (``torch.npu.synchronize``, ``torch.npu.Event(enable_timing=True)`` with
  ``record()`` / ``elapsed_time()``, the same contract as ``torch.cuda``; tensors moved with
  ``.to("npu:N")`` after ``import torch_npu``).
* option ``compile: true`` wraps the loaded program in ``torch.compile`` (default inductor backend).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import os
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..errors import BackendError, MissingDependencyError
from ..lowering import LoweringSpec
from .base import (
    Artifact,
    Backend,
    LatencyStats,
    cpu_info,
    device_lock,
    parse_device,
    repeat_to_batch,
    stable_hash,
    time_callables,
)
from .device_facts import cpu_has_any, npu_smi_facts, nvidia_smi_info
from .timing import TimedInRounds
from .worker import WorkerClient, pin_to

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
OPTIONS = ("compile", "dtype", "isolate", "pin_core", "timing")
TORCH_NPU_HINT = (
    "device 'npu:N' needs torch_npu (the Ascend adapter for PyTorch) and the CANN toolkit: "
    "pip install torch-npu (the version matching torch), then source <CANN>/set_env.sh"
)


def import_torch_npu():
    """Import torch_npu (registers ``torch.npu`` and the ``npu`` device) or say what is missing."""
    try:
        import torch_npu  # noqa: F401 - the import registers the device
    except ImportError as exc:
        raise MissingDependencyError(f"{TORCH_NPU_HINT} ({exc})") from exc
    return torch_npu


def native_dtype_problem(kind: str, dtype: str) -> str | None:
    """Why ``dtype`` does not run natively on a ``kind`` device, or None when it does."""
    if dtype == "float32":
        return None
    if kind == "cpu":
        need = {"float16": ("avx512_fp16", "amx_fp16"), "bfloat16": ("avx512_bf16", "amx_bf16")}[dtype]
        return None if cpu_has_any(need) else f"this CPU has none of {', '.join(need)}"
    if kind == "cuda" and dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
        return "this GPU has no native bfloat16"
    if kind == "npu" and dtype == "bfloat16" and not getattr(torch.npu, "is_bf16_supported", lambda: False)():
        return "this NPU has no native bfloat16"
    return None


def safe_load_program(path: Path) -> torch.export.ExportedProgram:
    """``torch.export.load`` that refuses pickled payloads (weights, constants, custom objects)."""
    try:
        with zipfile.ZipFile(path) as z:
            for name in z.namelist():
                if name.endswith("_config.json") and ("/data/weights/" in name or "/data/constants/" in name):
                    for fqn, meta in json.loads(z.read(name)).get("config", {}).items():
                        pickled = meta.get("use_pickle") or not str(meta.get("path_name", "")).startswith(
                            ("weight_", "tensor_")
                        )
                        if pickled:
                            raise BackendError(f"{path}: refusing a pickled payload ({fqn!r}) in the archive")
    except zipfile.BadZipFile as exc:
        raise BackendError(f"{path} is not a torch.export archive: {exc}") from exc
    old = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        return torch.export.load(str(path))
    except BackendError:
        raise
    except Exception as exc:
        raise BackendError(f"torch could not load {path}: {type(exc).__name__}: {exc}") from exc
    finally:
        if old is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = old


def describe_program(ep: torch.export.ExportedProgram) -> list:
    """The program's structure: every node's op, target, arguments and output shape/dtype (no values)."""

    def meta(v):
        if isinstance(v, torch.Tensor):
            return [[d if isinstance(d, int) else "B" for d in v.shape], str(v.dtype)]
        return None if v is None else type(v).__name__

    return [
        [n.op, str(n.target), str(n.args) if n.op != "placeholder" else "", meta(n.meta.get("val"))]
        for n in ep.graph.nodes
    ]


class TorchBackend(TimedInRounds, Backend):
    """Eager torch (optionally ``torch.compile``) on cpu, cuda:N or npu:N."""

    name = "torch"
    artifact_suffix = ".pt2"
    stored_bits = (32,)
    native_bits = (32,)
    sparsity_kinds = ("unstructured",)  # dense kernels: zeros save neither bytes nor time
    preferred_channel_multiple = 8  # AVX2 lanes (fp32) and tensor-core tiles (fp16) both like 8
    devices = ("cpu", "cuda:0", "npu:0")

    @classmethod
    def unavailable_reason(cls, device: str) -> str | None:
        try:
            kind, idx = parse_device(device)
        except BackendError as exc:
            return str(exc)
        if kind == "cpu":
            return None
        if kind == "cuda":
            if not torch.cuda.is_available():
                return f"torch {torch.__version__} sees no CUDA device (CPU-only build, no driver or no GPU)"
            n = torch.cuda.device_count()
            return None if idx < n else f"cuda:{idx} does not exist ({n} CUDA device(s))"
        if kind == "npu":
            try:
                import_torch_npu()
            except MissingDependencyError as exc:
                return str(exc)
            if not torch.npu.is_available():
                return "torch_npu is installed but sees no NPU (check `npu-smi info` and the driver)"
            n = torch.npu.device_count()
            return None if idx < n else f"npu:{idx} does not exist ({n} NPU(s))"
        return f"unknown device kind {kind!r}: the torch backend runs on cpu, cuda:N and npu:N"

    def __init__(self, device: str = "cpu", batch_size: int = 1, threads: int = 1, **options):
        unknown = set(options) - set(OPTIONS)
        if unknown:
            raise BackendError(
                f"torch backend: unknown option(s) {sorted(unknown)}; known: {', '.join(OPTIONS)}"
            )
        kind, _ = parse_device(device)
        if kind == "npu":
            import_torch_npu()  # MissingDependencyError names what to install
        reason = self.unavailable_reason(device)
        if reason:
            raise BackendError(f"torch backend: device {device!r} is not usable here: {reason}")
        dtype = options.get("dtype", "float32")
        if dtype not in DTYPES:
            raise BackendError(f"torch backend: dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        problem = native_dtype_problem(kind, dtype)
        if problem:
            raise BackendError(
                f"torch backend: dtype {dtype} does not run natively on {device} ({problem}); use float32"
            )
        super().__init__(device, batch_size, threads, **options)
        self.kind = kind
        self.dtype = DTYPES[dtype]
        self._worker: WorkerClient | None = None
        self._modules: dict[tuple[str, float], torch.nn.Module] = {}

    # -- lowering -------------------------------------------------------------------------------
    def lower(self, model, example_inputs, spec, out_dir, calibration=None, io=None) -> Artifact:
        layer_bits = LoweringSpec.coerce(spec).layer_bits()
        bad = {k: b for k, b in layer_bits.items() if b not in self.stored_bits}
        if bad:
            raise BackendError(
                f"torch backend stores float weights only (stored: 32); layers {sorted(bad)} ask for "
                f"{sorted(set(bad.values()))} bits"
            )
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        model = copy.deepcopy(model).eval().to(self.dtype)
        # batch 2: a batch of 1 would be specialized away
        args = tuple(self._cast(torch.cat([x, x])[:2]) for x in example_inputs)
        names = io.input_names if io is not None else tuple(f"input_{i}" for i in range(len(args)))
        axes = [(io.dynamic_axes.get(n, {0: "batch"}) if io is not None else {0: "batch"}) for n in names]
        shapes = tuple(
            {int(a): torch.export.Dim.AUTO for a in ax}  # export infers each dim's range (e.g. <= 512)
            for ax in axes
        )
        if _takes_varargs(model):  # deployable(): forward(*inputs) is one parameter to torch.export
            shapes = (shapes,)
        try:
            with torch.no_grad():
                ep = torch.export.export(model, args, dynamic_shapes=shapes)
        except Exception as exc:
            raise BackendError(
                f"torch.export failed: {type(exc).__name__}: {str(exc).splitlines()[0]}"
            ) from exc
        target = out_dir / "model.pt2"
        tmp = out_dir / ".model.tmp.pt2"
        torch.export.save(ep, str(tmp))
        os.replace(tmp, target)
        bits = torch.finfo(self.dtype).bits
        packed = sum(p.numel() * bits // 8 for p in model.parameters())
        return self.artifact_at(
            target,
            packed,
            dict(layer_bits),
            {
                "dtype": str(self.dtype).removeprefix("torch."),
                "compile": bool(self.options.get("compile")),
            },
        )

    # -- running --------------------------------------------------------------------------------
    def module(self, path: Path) -> torch.nn.Module:
        """The artifact's program as a module on the device (compiled if asked), cached per file."""
        path = Path(path)
        key = (str(path.resolve()), path.stat().st_mtime)
        if key not in self._modules:
            mod = safe_load_program(path).module().to(self.device)
            if self.options.get("compile"):
                mod = torch.compile(mod)
            self._modules = {key: mod, **dict(list(self._modules.items())[-3:])}
        return self._modules[key]

    def _input(self, x: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(x))
        return t.to(self.device, self.dtype if t.is_floating_point() else t.dtype)

    def _cast(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.dtype) if t.is_floating_point() else t

    def runner(self, artifact: Artifact):
        mod = self.module(artifact.path)

        def run(inputs: tuple[np.ndarray, ...]) -> np.ndarray:
            with torch.inference_mode():
                return mod(*(self._input(x) for x in inputs)).float().cpu().numpy()

        return run

    def _device_module(self):
        return getattr(torch, self.kind)

    def _timer(self) -> Callable[[Callable[[], object]], float] | None:
        """Event timing on accelerators (device time of one call), None on the CPU (wall clock)."""
        if self.kind == "cpu":
            return None
        dev = self._device_module()

        def timer(fn: Callable[[], object]) -> float:
            start, end = dev.Event(enable_timing=True), dev.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3

        return timer

    def time_local(self, artifacts: list[Artifact], x, **limits) -> list[LatencyStats]:
        """Time artifacts side by side in this process (the worker calls this); ``x``: one array
        per input (a single array for one input)."""
        mods = [self.module(a.path) for a in artifacts]
        xs = (x,) if isinstance(x, np.ndarray) else tuple(x)
        xt = tuple(self._input(a) for a in xs)
        threads = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        sync = self._device_module().synchronize if self.kind != "cpu" else None
        try:
            with torch.inference_mode():
                fns = [lambda m=m: m(*xt) for m in mods]
                return time_callables(
                    fns, device=self.device, batch_size=len(xs[0]), sync=sync, timer=self._timer(), **limits
                )
        finally:
            torch.set_num_threads(threads)

    def _feed(self, example_inputs) -> tuple[np.ndarray, ...]:
        return repeat_to_batch(example_inputs, self.batch_size)

    def _time(self, artifacts: list[Artifact], example_inputs) -> list[LatencyStats]:
        x = self._feed(example_inputs)
        limits = self.options.get("timing", {})
        with device_lock(self.device):
            if not self.options.get("isolate", True):
                with _pinned(self.options.get("pin_core")):
                    return self.time_local(artifacts, x, **limits)
            if self._worker is None:
                self._worker = WorkerClient(self.threads)
            options = {k: v for k, v in self.options.items() if k in ("compile", "dtype")}
            return self._worker.time(self, [a.path for a in artifacts], x, limits, options)

    def close(self) -> None:
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.close()
        self._modules.clear()

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()

    # -- facts ----------------------------------------------------------------------------------
    def fingerprint(self, artifact: Artifact) -> str | None:
        return stable_hash(describe_program(safe_load_program(artifact.path)))

    def example_inputs_for(self, artifact: Artifact) -> tuple[torch.Tensor, ...]:
        ep = safe_load_program(artifact.path)
        nodes = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
        out = []
        for name in ep.graph_signature.user_inputs:
            v = nodes[name].meta["val"]
            out.append(torch.zeros([d if isinstance(d, int) else 1 for d in v.shape], dtype=torch.float32))
        return tuple(out)

    def versions(self) -> dict[str, str]:
        v = {"torch": torch.__version__}
        if self.kind == "cuda":
            v["cuda"] = str(torch.version.cuda)
        if self.kind == "npu":
            v["torch_npu"] = getattr(import_torch_npu(), "__version__", "unknown")
        return v

    def device_info(self) -> dict:
        return _device_info(self.device)


@contextlib.contextmanager
def _pinned(cores):
    if cores is None:
        yield
        return
    before = os.sched_getaffinity(0)
    pin_to(cores)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


@functools.cache
def _device_info(device: str) -> dict:
    kind, idx = parse_device(device)
    if kind == "cuda":
        driver = nvidia_smi_info(idx)["driver"] or nvidia_smi_info(0)["driver"]
        return {"name": torch.cuda.get_device_name(idx), "count": torch.cuda.device_count(), "driver": driver}
    if kind == "npu":
        facts = npu_smi_facts()
        return {
            "name": torch.npu.get_device_name(idx),
            "count": torch.npu.device_count(),
            "driver": facts.get("driver"),
        }
    return cpu_info()


def _takes_varargs(model: torch.nn.Module) -> bool:
    import inspect

    params = list(inspect.signature(model.forward).parameters.values())
    return len(params) == 1 and params[0].kind is inspect.Parameter.VAR_POSITIONAL
