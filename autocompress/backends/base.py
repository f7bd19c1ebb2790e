"""Backend protocol, artifacts, latency statistics and the shared timing loop."""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from ..errors import BackendError
from ..lowering import LoweringSpec
from .device_facts import cpu_info  # noqa: F401 - re-exported: backends import it from here
from .timing import (  # noqa: F401 - re-exported: backends and tests import them from here
    MIN_CALLS,
    LatencyStats,
    device_lock,
    lock_dir,
    time_callable,
    time_callables,
    timing_bound_s,
)


@dataclass
class Artifact:
    """A deployable file produced by a backend.

    Attributes:
        path: the file itself (e.g. ``model.onnx``).
        backend / device: who made it and where it runs.
        size_bytes: bytes on disk (the size objective).
        packed_size_bytes: theoretical size with every weight at its plan's bit width (labelled so).
        layer_bits: layer name -> bits as lowered.
        meta: backend-specific facts (kernels ORT actually runs, opset, ...).
    """

    path: Path
    backend: str
    device: str
    size_bytes: int
    packed_size_bytes: int
    layer_bits: dict[str, int] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)


def parse_device(device: str) -> tuple[str, int]:
    """``"cuda:1"`` -> ``("cuda", 1)``; ``"cpu"`` -> ``("cpu", 0)``.

    Raises:
        BackendError: not ``kind`` or ``kind:N``.
    """
    kind, sep, idx = device.partition(":")
    if not kind or (sep and not idx.isdigit()):
        raise BackendError(f"device {device!r} is not of the form 'cpu', 'cuda:N' or 'npu:N'")
    return kind, int(idx) if sep else 0


def wrong_device(device: str, kind: str, reason: str) -> str | None:
    """``reason`` when ``device`` is not of ``kind`` (the parse error when it is no device at all), else
    None: the shared first step of a backend's :meth:`Backend.unavailable_reason`."""
    try:
        got, _ = parse_device(device)
    except BackendError as exc:
        return str(exc)
    return None if got == kind else reason


def _as_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _whole_arrays(inputs, labels, score):
    """``(inputs, labels, score(outputs, labels))`` given as whole arrays, as batches of 256 and a metric."""
    from ..metrics import Metric, resolve_metric

    x, y = _as_numpy(inputs), None if labels is None else _as_numpy(labels)
    batches = [((x[i : i + 256],), None if y is None else y[i : i + 256]) for i in range(0, len(x), 256)]
    if isinstance(score, Metric | str):
        return batches, resolve_metric(score), None
    return batches, Metric(getattr(score, "__name__", "score"), fn=score, reduce="all"), None


def repeat_to_batch(example_inputs, batch_size: int) -> tuple[np.ndarray, ...]:
    """Each example input repeated along the batch axis to ``batch_size`` rows (the timed feed)."""
    out = []
    for t in example_inputs:
        x = _as_numpy(t)
        reps = -(-batch_size // len(x))
        out.append(np.ascontiguousarray(np.concatenate([x] * reps)[:batch_size]))
    return tuple(out)


def score_outputs(
    logits: np.ndarray, labels: np.ndarray, score: Callable[[np.ndarray, np.ndarray], float]
) -> float:
    """The metric of an artifact's outputs; non-finite outputs are a backend failure, not a score."""
    if not np.all(np.isfinite(logits)):
        raise BackendError("the artifact produced non-finite outputs")
    return score(logits, labels)


class Backend(ABC):
    """Lowers a compressed torch model to a deployable artifact, evaluates it and times it.

    Class-level capabilities tell the search what the backend can store and what it runs natively.
    """

    name: ClassVar[str]
    stored_bits: ClassVar[tuple[int, ...]]  # bit widths the artifact can hold
    native_bits: ClassVar[tuple[int, ...]]  # bit widths with real kernels (faster, not only smaller)
    sparsity_kinds: ClassVar[tuple[str, ...]] = ("unstructured",)  # stored; none run sparse kernels
    # inventory kind -> the bit widths a layer of that kind can be stored in, where it differs from
    # ``stored_bits``: embedding tables stay float unless a backend lowers their lookups (onnxruntime)
    bits_by_kind: ClassVar[dict[str, tuple[int, ...]]] = {"Embedding": (32,)}
    reduce_range: ClassVar[bool] = False  # 8-bit weights use a 7-bit grid (see quantize.qmax_for)
    preferred_channel_multiple: ClassVar[int] = 1  # channel counts that fill the device's vector units
    devices: ClassVar[tuple[str, ...]] = ("cpu",)  # device kinds it targets (the conformance suite's default)
    artifact_suffix: ClassVar[str] = ""  # the deployable file's extension, e.g. ".onnx"

    def __init__(self, device: str = "cpu", batch_size: int = 1, threads: int = 1, **options):
        self.device = device
        self.batch_size = batch_size
        self.threads = threads
        self.options = options

    @abstractmethod
    def lower(
        self,
        model: torch.nn.Module,
        example_inputs: tuple[torch.Tensor, ...],
        spec: LoweringSpec | dict[str, int],
        out_dir: Path,
        calibration: tuple[np.ndarray, ...] | None = None,
        io=None,
    ) -> Artifact:
        """Write the deployable artifact for ``model`` with each layer lowered as ``spec`` says.

        ``spec``: the :class:`~autocompress.lowering.LoweringSpec` that ``compress`` returned with the model
        (per layer: bits, static or dynamic, the trained weight grid; the activation calibration), or a
        plain ``{module: bits}`` map (static layers on the symmetric per-channel min-max grid).

        ``model`` takes positional tensor inputs and returns one tensor (see
        :func:`autocompress.tasks.data.deployable`); ``io`` (an :class:`~autocompress.tasks.data.IOSpec`)
        names the inputs and their dynamic axes (default: one input ``input`` with a dynamic batch).
        ``calibration``: sample inputs for activation ranges, one array per input.
        """

    @abstractmethod
    def runner(self, artifact: Artifact) -> Callable[[tuple[np.ndarray, ...]], np.ndarray]:
        """A callable running the artifact on one batch of positional inputs; returns its output."""

    def evaluate(
        self,
        artifact: Artifact,
        data: Iterable[tuple[tuple, object]],
        metric,
        reference: Iterable[np.ndarray] | None = None,
    ) -> float:
        """The metric of the artifact itself (not of the torch model), streamed over ``data``.

        Args:
            data: batches ``(inputs, targets)``: inputs a tuple of tensors or arrays in the artifact's
                input order, targets a tensor, an array or None.
            metric: an :class:`autocompress.metrics.Metric`.
            reference: the teacher's outputs, one array per batch (metrics that compare to it).

        Raises:
            BackendError: the artifact produced non-finite outputs.
        """
        if isinstance(data, np.ndarray | torch.Tensor):  # whole arrays: evaluate(art, x, labels, score_fn)
            data, metric, reference = _whole_arrays(data, metric, reference)
        run = self.runner(artifact)
        state = metric.start()
        refs = iter(reference) if reference is not None else None
        for inputs, targets in data:
            feeds = tuple(np.ascontiguousarray(_as_numpy(t)) for t in inputs)
            out = np.asarray(run(feeds))
            if not np.all(np.isfinite(out)):
                raise BackendError("the artifact produced non-finite outputs")
            ref = next(refs) if refs is not None else None
            metric.update(state, out, None if targets is None else _as_numpy(targets), ref)
        return metric.result(state)

    @abstractmethod
    def measure(self, artifact: Artifact, example_inputs: tuple[torch.Tensor, ...]) -> LatencyStats:
        """Latency on the target device at ``self.batch_size``, under the device lock."""

    def measure_pair(
        self, artifact: Artifact, reference: Artifact, example_inputs: tuple[torch.Tensor, ...]
    ) -> tuple[LatencyStats, LatencyStats]:
        """Latency of ``artifact`` and of ``reference`` (the baseline), timed side by side.

        Backends should interleave the two so that their ratio is immune to drift; this default
        times them one after the other.
        """
        return self.measure(artifact, example_inputs), self.measure(reference, example_inputs)

    def measure_group(
        self, artifacts: list[Artifact], reference: Artifact, example_inputs, **limits
    ) -> list[tuple[LatencyStats, LatencyStats]]:
        """Each of ``artifacts`` timed side by side with ``reference``: ``(stats, reference stats)`` per
        artifact (a latency profile times many small variants of one model).

        Backends that time a list in one session (alternating blocks) override it so that every
        ratio comes from the same session; ``limits`` are :func:`time_callables` keywords (shorter
        rounds). This default times one pair after the other.
        """
        return [self.measure_pair(a, reference, example_inputs) for a in artifacts]

    def start_timing(self) -> None:  # noqa: B027 - optional hook, nothing to start by default
        """Start, in the background, what timing will need (e.g. a timing worker process), so that it is
        ready when the first artifact is timed; called when a run starts. ``close`` ends it."""

    def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release processes or sessions the backend holds."""

    @classmethod
    def capabilities(cls) -> dict:
        return {
            "stored_bits": list(cls.stored_bits),
            "native_bits": list(cls.native_bits),
            "sparsity_kinds": list(cls.sparsity_kinds),
            "bits_by_kind": {k: list(v) for k, v in cls.bits_by_kind.items()},
            "reduce_range": cls.reduce_range,
            "preferred_channel_multiple": cls.preferred_channel_multiple,
        }

    @classmethod
    def unavailable_reason(cls, device: str) -> str | None:
        """Why ``device`` cannot be used on this machine (missing library, driver, hardware), or None."""
        return None if device == "cpu" else f"backend {cls.name!r} does not support device {device!r}"

    def versions(self) -> dict[str, str]:
        return {"torch": torch.__version__}

    def device_info(self) -> dict:
        """The device timed on: name, count and driver (None where unknown)."""
        return cpu_info()

    def timing_identity(self) -> dict:
        """Everything besides the artifact's structure that changes its latency (the cache key's rest)."""
        return {
            "backend": self.name,
            "device": self.device,
            "device_name": self.device_info().get("name"),
            "batch_size": self.batch_size,
            "threads": self.threads,
            "options": {k: v for k, v in sorted(self.options.items()) if k not in ("timing",)},
            "versions": self.versions(),
        }

    def fingerprint(self, artifact: Artifact) -> str | None:
        """Hash of the artifact's structure (graph, dtypes, shapes; not the weights' values).

        Two artifacts with the same fingerprint run the same kernels on the same shapes, so they take
        the same time: the latency cache is keyed by it. None: this backend cannot tell (no caching).
        """
        return None

    def artifact_at(self, target: Path, packed_bytes: float, layer_bits: dict, meta: dict) -> Artifact:
        """The :class:`Artifact` for the file ``target`` this backend just wrote (its size read from disk)."""
        return Artifact(
            path=target,
            backend=self.name,
            device=self.device,
            size_bytes=target.stat().st_size,
            packed_size_bytes=round(packed_bytes),
            layer_bits=dict(layer_bits),
            meta=meta,
        )

    def load_artifact(self, path: Path) -> Artifact:
        """An :class:`Artifact` for a file this backend wrote earlier (for ``autocompress measure``)."""
        path = Path(path)
        if not path.is_file():
            raise BackendError(f"artifact {path} does not exist")
        if self.artifact_suffix and path.suffix != self.artifact_suffix:
            raise BackendError(f"{self.name} backend: {path} is not a {self.artifact_suffix} file")
        size = path.stat().st_size
        return Artifact(path, self.name, self.device, size, size)

    def example_inputs_for(self, artifact: Artifact) -> tuple[torch.Tensor, ...]:
        """Inputs of the artifact's shape (batch 1, zeros), read from the artifact itself."""
        raise BackendError(f"backend {self.name!r} cannot read input shapes from {artifact.path.name}")


def stable_hash(obj: object) -> str:
    """SHA-256 (first 20 hex digits) of a JSON-able object, key order independent."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]
