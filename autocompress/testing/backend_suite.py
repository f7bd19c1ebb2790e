"""The backend conformance suite: the checks every autocompress backend must pass, on every device.

A backend must lower a torch model to a file, run it (its outputs agree with torch's), report the
file's bytes, time it under the machine-wide device lock with sane statistics, time two artifacts side
by side, fingerprint an artifact's structure (or say it cannot) and reload an artifact it wrote.

Each check is a plain function raising ``AssertionError`` when the backend does not conform
(``check_*``; they take a :class:`BackendCase`, made by :func:`prepare_case`). They run three ways:

* pytest, one backend: subclass :class:`BackendConformance` in a test module, override ``make_backend``::

      class TestMyBackend(BackendConformance):
          def make_backend(self):
              return MyBackend(device="cpu", batch_size=1, threads=1)

* pytest, several backends or devices: override the ``backend_factory`` fixture (it may take a
  parametrized fixture, e.g. ``target``; :func:`conformance_targets` and :func:`registered_backend`
  turn ``--backend NAME[:DEVICE]`` selections of the registry into targets and backends).
* no test runner: ``run_backend_suite(lambda: MyBackend(), workdir)`` runs every check and raises the
  first ``AssertionError`` (it says which check); it returns each check's outcome.

This module imports pytest (skips and fixtures); ``autocompress.testing`` itself does not.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from filelock import FileLock, Timeout
from torch import nn

from ..backends import BACKENDS
from ..backends.base import Artifact, Backend, lock_dir
from ..lowering import LoweringSpec
from ..plan import SUPPORTED_BITS
from ..registry import Registry
from ._check import check
from .models import Heavy, Tiny

__all__ = [
    "CHECKS",
    "BackendCase",
    "BackendConformance",
    "Heavy",
    "Tiny",
    "check_artifact_agrees_with_torch",
    "check_artifact_reloads_with_its_input_shape",
    "check_artifact_size_is_its_bytes_on_disk",
    "check_capabilities_are_declared",
    "check_fingerprint_is_structural",
    "check_latency_stats_are_sane_and_timed_under_the_device_lock",
    "check_measure_pair_times_both_side_by_side",
    "conformance_targets",
    "default_tolerance",
    "lower",
    "prepare_case",
    "registered_backend",
    "run_backend_suite",
]


def lower(
    backend: Backend,
    model: nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    out_dir: Path,
    spec: LoweringSpec | dict[str, int] | None = None,
    calibration: tuple[np.ndarray, ...] | None = None,
) -> Artifact:
    """The one place the suites call :meth:`Backend.lower` (both suites lower through this).

    ``spec``: the :class:`~autocompress.lowering.LoweringSpec` that ``compress`` returned, or a plain
    ``{layer: bits}`` map (weights on the min-max grid); None lowers the model in float."""
    return backend.lower(model, example_inputs, spec if spec is not None else {}, Path(out_dir), calibration)


@dataclass
class BackendCase:
    """What the checks share: the backend, 40 labelled 1x8x8 inputs and a :class:`Tiny` lowered by it."""

    backend: Backend
    x: torch.Tensor
    y: torch.Tensor
    model: nn.Module
    artifact: Artifact

    @property
    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        return (self.x[:1],)


def prepare_case(backend: Backend, out_dir: Path) -> BackendCase:
    """Seeded data and the seeded :class:`Tiny` lowered by ``backend`` into ``out_dir``."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(40, 1, 8, 8, generator=g)
    y = torch.randint(0, 10, (40,), generator=g)
    torch.manual_seed(0)
    model = Tiny().eval()
    return BackendCase(backend, x, y, model, lower(backend, model, (x[:1],), out_dir))


def default_tolerance(backend: Backend) -> float:
    """fp32 on the CPU: exact up to rounding; accelerators may use TF32/HF32 for fp32 convolutions
    (cuDNN and torch_npu defaults); fp16 (the ascend backend, dtype options) much coarser."""
    if backend.name == "ascend" or getattr(backend, "dtype", torch.float32) != torch.float32:
        return 3e-2
    return 1e-4 if backend.device == "cpu" else 3e-3


def check_capabilities_are_declared(backend: Backend) -> None:
    caps = backend.capabilities()
    check(32 in caps["stored_bits"] and set(caps["stored_bits"]) <= set(SUPPORTED_BITS), caps)
    check(set(caps["native_bits"]) <= set(caps["stored_bits"]), caps)
    check(caps["sparsity_kinds"] and isinstance(caps["preferred_channel_multiple"], int), caps)
    check(caps["preferred_channel_multiple"] >= 1, caps)
    dev = backend.device_info()
    check({"name", "count", "driver"} <= set(dev) and dev["name"], dev)
    versions = backend.versions()
    check(versions and all(isinstance(v, str) for v in versions.values()), versions)


def check_artifact_agrees_with_torch(case: BackendCase, tolerance: float | None = None) -> None:
    """The artifact's logits are torch's (within ``tolerance``, default :func:`default_tolerance`), and
    the score ``evaluate`` returns is the score of those logits."""
    seen = []

    def capture(logits, labels):
        seen.append(logits)
        return float((logits.argmax(1) == labels).mean())

    acc = case.backend.evaluate(case.artifact, case.x.numpy(), case.y.numpy(), capture)
    with torch.no_grad():
        ref = case.model(case.x).numpy()
    check(seen and seen[0].shape == ref.shape, (None if not seen else seen[0].shape, ref.shape))
    tol = default_tolerance(case.backend) if tolerance is None else tolerance
    np.testing.assert_allclose(seen[0], ref, atol=tol * max(1.0, float(np.abs(ref).max())), rtol=tol)
    expected = float((ref.argmax(1) == case.y.numpy()).mean())
    check(abs(acc - expected) <= 1 / len(case.y) + 1e-9, (acc, expected))


def check_artifact_size_is_its_bytes_on_disk(case: BackendCase) -> None:
    art = case.artifact
    check(art.path.is_file(), art.path)
    check(art.size_bytes == art.path.stat().st_size > 0, (art.size_bytes, art.path.stat().st_size))
    check(art.packed_size_bytes > 0, art.packed_size_bytes)


@contextlib.contextmanager
def _env(name: str, value: str | None) -> Iterator[None]:
    """``os.environ[name] = value`` for the block (nothing when value is None), restored afterwards."""
    if value is None:
        yield
        return
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _device_lock_probe(device: str) -> FileLock:
    return FileLock(str(lock_dir() / f"{''.join(c if c.isalnum() else '_' for c in device)}.lock"))


def check_latency_stats_are_sane_and_timed_under_the_device_lock(
    case: BackendCase, private_lock_dir: Path | None = None
) -> None:
    """``measure`` holds the device's lock file while timing and releases it; its statistics are sane.

    ``private_lock_dir``: lock files there for the check (other runs on the machine cannot interfere).
    """
    backend, result = case.backend, {}

    def timed():
        try:
            result["stats"] = backend.measure(case.artifact, case.example_inputs)
        except BaseException as exc:  # re-raised below, in the caller's thread
            result["error"] = exc

    with _env("AUTOCOMPRESS_LOCK_DIR", None if private_lock_dir is None else str(private_lock_dir)):
        thread = threading.Thread(target=timed)
        thread.start()
        held = free = 0
        probe = _device_lock_probe(backend.device)
        while thread.is_alive():
            try:
                probe.acquire(timeout=0)
                probe.release()
                free += 1
            except Timeout:
                held += 1
            time.sleep(0.02)
        thread.join()
        if "error" in result:
            raise result["error"]
        check(held > 0, "the device lock was never held while measuring")
        probe.acquire(timeout=0)  # released afterwards (raises Timeout if not)
        probe.release()
    st = result["stats"]
    # at least one whole block of 50 calls is reported from (the protocol's floor for a fast call when
    # the machine's load sets later rounds aside as disturbed until the time cap)
    check(st.n >= 50 and st.median_ms > 0, (st.n, st.median_ms))
    # the reported CI is the notch rule's on the reported spread and count
    expected = 1.57 * st.iqr_ms / st.n**0.5 / st.median_ms
    check(math.isclose(st.rel_ci, expected, rel_tol=1e-6, abs_tol=1e-12), (st.rel_ci, expected))
    check(st.batch_size == 1 and st.device == backend.device, (st.batch_size, st.device, backend.device))


def check_measure_pair_times_both_side_by_side(case: BackendCase, out_dir: Path) -> None:
    """measure_pair times the two artifacts in the same rounds, alternating blocks of calls.

    Timed one after the other, each would stop on its own: the 1x8x8 model (tens of microseconds a call
    on a CPU) would make thousands of calls in blocks of 50, the heavy one (0.5 ms or more) hundreds, in
    smaller blocks. Timed side by side, both run the blocks the slower one sets, round after
    round: the same count, and the same share of rounds set aside as disturbed.
    """
    backend = case.backend
    torch.manual_seed(0)
    heavy = lower(backend, Heavy().eval(), case.example_inputs, out_dir)
    a, b = backend.measure_pair(heavy, case.artifact, case.example_inputs)
    # (no minimum count: on a busy machine most rounds may be set aside as disturbed, for both alike)
    check(a.n == b.n > 0 and a.disturbed == b.disturbed, (a.n, b.n, a.disturbed, b.disturbed))
    if backend.device == "cpu":
        # in argument order: the heavy artifact first. Measured 4.6x (CI) to 30x (here) slower; swapped
        # results would read the other way round, so 2x separates the two without timing the machine
        check(a.median_ms > 2 * b.median_ms, (a.median_ms, b.median_ms))


def check_fingerprint_is_structural(case: BackendCase, out_dir: Path) -> None:
    """Same graph, dtypes and shapes with other weights: the same fingerprint; a wider layer: another.
    Skipped (``pytest.skip``) for a backend whose ``fingerprint`` returns None (no latency cache)."""
    backend, out_dir = case.backend, Path(out_dir)
    torch.manual_seed(1)
    other_weights = lower(backend, Tiny().eval(), case.example_inputs, out_dir / "w")
    wider = lower(backend, Tiny(width=16).eval(), case.example_inputs, out_dir / "x")
    fp = backend.fingerprint(case.artifact)
    if fp is None:
        pytest.skip(f"backend {backend.name!r} does not fingerprint artifacts (no latency cache)")
    check(backend.fingerprint(other_weights) == fp, "other weights changed the fingerprint")
    check(backend.fingerprint(wider) != fp, "a wider layer kept the fingerprint")


def check_artifact_reloads_with_its_input_shape(case: BackendCase) -> None:
    again = case.backend.load_artifact(case.artifact.path)
    check(again.size_bytes == case.artifact.size_bytes, (again.size_bytes, case.artifact.size_bytes))
    (x,) = case.backend.example_inputs_for(again)
    check(tuple(x.shape) == tuple(case.example_inputs[0].shape), tuple(x.shape))


# name -> (check, whether it takes a scratch folder), in the order run_backend_suite runs them
CHECKS: dict[str, tuple[Callable, bool]] = {
    "capabilities_are_declared": (lambda case: check_capabilities_are_declared(case.backend), False),
    "artifact_agrees_with_torch": (check_artifact_agrees_with_torch, False),
    "artifact_size_is_its_bytes_on_disk": (check_artifact_size_is_its_bytes_on_disk, False),
    "latency_stats_are_sane_and_timed_under_the_device_lock": (
        check_latency_stats_are_sane_and_timed_under_the_device_lock,
        True,
    ),
    "measure_pair_times_both_side_by_side": (check_measure_pair_times_both_side_by_side, True),
    "fingerprint_is_structural": (check_fingerprint_is_structural, True),
    "artifact_reloads_with_its_input_shape": (check_artifact_reloads_with_its_input_shape, False),
}


def run_backend_suite(
    backend_factory: Callable[[], Backend],
    workdir: Path,
    only: list[str] | None = None,
    tolerance: float | None = None,
) -> dict[str, str]:
    """Every check (or those named in ``only``) on one backend made by ``backend_factory``.

    Returns check name -> ``"passed"`` or ``"skipped: REASON"``. Raises the first failed check's
    ``AssertionError`` (with a note naming it); the backend is closed in any case.
    """
    unknown = sorted(set(only or ()) - set(CHECKS))
    if unknown:
        raise ValueError(f"unknown backend checks {unknown}; known: {', '.join(CHECKS)}")
    workdir = Path(workdir)
    backend = backend_factory()
    outcomes: dict[str, str] = {}
    try:
        case = prepare_case(backend, workdir / "case")
        for name, (check, scratch) in CHECKS.items():
            if only is not None and name not in only:
                continue
            args = [case]
            if scratch:
                (workdir / name).mkdir(parents=True, exist_ok=True)
                args.append(workdir / name)
            kwargs = {"tolerance": tolerance} if check is check_artifact_agrees_with_torch else {}
            try:
                check(*args, **kwargs)
            except pytest.skip.Exception as exc:
                outcomes[name] = f"skipped: {exc.msg}"
                continue
            except AssertionError as exc:
                exc.add_note(f"backend conformance check {name!r} failed for {backend.name}:{backend.device}")
                raise
            outcomes[name] = "passed"
    finally:
        backend.close()
    return outcomes


def conformance_targets(selected: list[str], registry: Registry = BACKENDS) -> list[tuple[str, str]]:
    """(backend name, device) pairs for ``--backend NAME[:DEVICE]`` selections (repeatable); a device kind
    alone (``npu``) selects every backend declaring it; none: every backend on each device it declares."""
    if not selected:
        return [(name, dev) for name in registry for dev in registry.get(name).devices]
    out = []
    for item in selected:
        name, _, device = item.partition(":")
        if name in registry:
            devices = [device] if device else list(registry.get(name).devices)
            out += [(name, d) for d in devices]
        else:  # a device kind: every backend that declares it
            found = [(n, d) for n in registry for d in registry.get(n).devices if d.partition(":")[0] == name]
            if not found:
                raise pytest.UsageError(
                    f"--backend {item}: {registry.unknown_message(name)} (or a device kind)"
                )
            out += found
    return out


def registered_backend(name: str, device: str, registry: Registry = BACKENDS, **kwargs) -> Backend:
    """The registered backend ``name`` on ``device`` (batch 1, one thread unless ``kwargs`` say other);
    ``pytest.skip`` with the backend's own reason where that device is not available here."""
    cls = registry.get(name)
    reason = cls.unavailable_reason(device)
    if reason:
        pytest.skip(f"{name}:{device} is not available here: {reason}")
    return cls(device=device, **{"batch_size": 1, "threads": 1, **kwargs})


class BackendConformance:
    """The suite as pytest tests: subclass it (as ``Test...``) and override :meth:`make_backend`, or the
    ``backend_factory`` fixture to parametrize; override :meth:`tolerance` for coarser numerics."""

    def make_backend(self) -> Backend:
        raise NotImplementedError(
            f"{type(self).__name__}: override make_backend() or the backend_factory fixture"
        )

    def tolerance(self, backend: Backend) -> float:
        return default_tolerance(backend)

    @pytest.fixture(scope="class")
    def backend_factory(self) -> Callable[[], Backend]:
        return self.make_backend

    @pytest.fixture(scope="class")
    def backend(self, backend_factory):
        be = backend_factory()
        yield be
        be.close()

    @pytest.fixture(scope="class")
    def conformance_case(self, backend, tmp_path_factory) -> BackendCase:
        safe = "".join(c if c.isalnum() else "_" for c in f"{backend.name}_{backend.device}")
        return prepare_case(backend, tmp_path_factory.mktemp(safe))

    def test_capabilities_are_declared(self, backend):
        check_capabilities_are_declared(backend)

    def test_artifact_agrees_with_torch(self, conformance_case):
        check_artifact_agrees_with_torch(conformance_case, self.tolerance(conformance_case.backend))

    def test_artifact_size_is_its_bytes_on_disk(self, conformance_case):
        check_artifact_size_is_its_bytes_on_disk(conformance_case)

    def test_latency_stats_are_sane_and_timed_under_the_device_lock(self, conformance_case, tmp_path):
        check_latency_stats_are_sane_and_timed_under_the_device_lock(conformance_case, tmp_path)

    def test_measure_pair_times_both_side_by_side(self, conformance_case, tmp_path):
        check_measure_pair_times_both_side_by_side(conformance_case, tmp_path)

    def test_fingerprint_is_structural(self, conformance_case, tmp_path):
        check_fingerprint_is_structural(conformance_case, tmp_path)

    def test_artifact_reloads_with_its_input_shape(self, conformance_case):
        check_artifact_reloads_with_its_input_shape(conformance_case)
