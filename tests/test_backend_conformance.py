"""The backend conformance suite: the same checks for every registered backend and device.

By default every registered backend runs on each device kind it declares (``Backend.devices``);
those unavailable here are skipped with the reason. Select with ``--backend NAME[:DEVICE]``
(repeatable), or a device kind alone (``--backend npu`` = every backend that targets npu:0)::

    python -m pytest tests/test_backend_conformance.py --backend torch:cuda:0 --backend onnxruntime:cuda:0
    python -m pytest tests/test_backend_conformance.py --backend npu
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from filelock import FileLock, Timeout
from torch import nn

from autocompress.backends import BACKENDS
from autocompress.backends.base import lock_dir
from autocompress.plan import SUPPORTED_BITS


def _targets(selected: list[str]) -> list[tuple[str, str]]:
    if not selected:
        return [(name, dev) for name in BACKENDS for dev in BACKENDS.get(name).devices]
    out = []
    for item in selected:
        name, _, device = item.partition(":")
        if name in BACKENDS:
            devices = [device] if device else list(BACKENDS.get(name).devices)
            out += [(name, d) for d in devices]
        else:  # a device kind: every backend that declares it
            found = [(n, d) for n in BACKENDS for d in BACKENDS.get(n).devices if d.partition(":")[0] == name]
            if not found:
                raise pytest.UsageError(
                    f"--backend {item}: {BACKENDS.unknown_message(name)} (or a device kind)"
                )
            out += found
    return out


def pytest_generate_tests(metafunc):
    if "target" in metafunc.fixturenames:
        targets = _targets(metafunc.config.getoption("--backend"))
        metafunc.parametrize("target", targets, ids=[f"{n}:{d}" for n, d in targets], scope="module")


class Tiny(nn.Module):
    """Conv + ReLU + pooling + Linear on 1x8x8 inputs (every backend must run this)."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(1, width, 3, padding=1)
        self.fc = nn.Linear(width * 16, 10)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        x = nn.functional.max_pool2d(x, 2)
        return self.fc(x.flatten(1))


@pytest.fixture(scope="module")
def backend(target):
    name, device = target
    cls = BACKENDS.get(name)
    reason = cls.unavailable_reason(device)
    if reason:
        pytest.skip(f"{name}:{device} is not available here: {reason}")
    be = cls(device=device, batch_size=1, threads=1)
    yield be
    be.close()


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(40, 1, 8, 8, generator=g)
    y = torch.randint(0, 10, (40,), generator=g)
    return x, y


@pytest.fixture(scope="module")
def lowered(backend, data, tmp_path_factory):
    torch.manual_seed(0)
    model = Tiny().eval()
    art = backend.lower(model, (data[0][:1],), {}, tmp_path_factory.mktemp(backend.name))
    return model, art


def _tolerance(backend) -> float:
    """fp32 on the CPU: exact up to rounding; accelerators may use TF32/HF32 for fp32 convolutions
    (cuDNN and torch_npu defaults); fp16 (the ascend backend, dtype options) much coarser."""
    if backend.name == "ascend" or getattr(backend, "dtype", torch.float32) != torch.float32:
        return 3e-2
    return 1e-4 if backend.device == "cpu" else 3e-3


def test_capabilities_are_declared(backend):
    caps = backend.capabilities()
    assert 32 in caps["stored_bits"] and set(caps["stored_bits"]) <= set(SUPPORTED_BITS)
    assert set(caps["native_bits"]) <= set(caps["stored_bits"])
    assert caps["sparsity_kinds"] and isinstance(caps["preferred_channel_multiple"], int)
    assert caps["preferred_channel_multiple"] >= 1
    dev = backend.device_info()
    assert {"name", "count", "driver"} <= set(dev) and dev["name"]
    assert backend.versions() and all(isinstance(v, str) for v in backend.versions().values())


def test_artifact_agrees_with_torch(backend, lowered, data):
    model, art = lowered
    x, y = data
    seen = []

    def capture(logits, labels):
        seen.append(logits)
        return float((logits.argmax(1) == labels).mean())

    acc = backend.evaluate(art, x.numpy(), y.numpy(), capture)
    with torch.no_grad():
        ref = model(x).numpy()
    assert seen[0].shape == ref.shape
    tol = _tolerance(backend)
    np.testing.assert_allclose(seen[0], ref, atol=tol * max(1.0, float(np.abs(ref).max())), rtol=tol)
    assert acc == pytest.approx(float((ref.argmax(1) == y.numpy()).mean()), abs=1 / len(y) + 1e-9)


def test_artifact_size_is_its_bytes_on_disk(lowered):
    _, art = lowered
    assert art.path.is_file() and art.size_bytes == art.path.stat().st_size > 0
    assert art.packed_size_bytes > 0


def test_latency_stats_are_sane_and_timed_under_the_device_lock(
    backend, lowered, data, tmp_path, monkeypatch
):
    monkeypatch.setenv("AUTOCOMPRESS_LOCK_DIR", str(tmp_path))  # private locks: other runs cannot interfere
    _, art = lowered
    result = {}
    thread = threading.Thread(target=lambda: result.update(stats=backend.measure(art, (data[0][:1],))))
    thread.start()
    held = free = 0
    probe = FileLock(str(lock_dir() / f"{''.join(c if c.isalnum() else '_' for c in backend.device)}.lock"))
    while thread.is_alive():
        try:
            probe.acquire(timeout=0)
            probe.release()
            free += 1
        except Timeout:
            held += 1
        time.sleep(0.02)
    thread.join()
    st = result["stats"]
    assert held > 0, "the device lock was never held while measuring"
    probe.acquire(timeout=0)  # released afterwards
    probe.release()
    assert st.n >= 100 and st.median_ms > 0
    # the reported CI is the notch rule's on the reported spread and count
    assert st.rel_ci == pytest.approx(1.57 * st.iqr_ms / st.n**0.5 / st.median_ms, rel=1e-6)
    assert st.batch_size == 1 and st.device == backend.device


class Heavy(nn.Module):
    """Three 128-channel 3x3 convolutions on 1x8x8 inputs (19M MACs): much slower than Tiny on a CPU."""

    def __init__(self):
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(1, 128, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(128, 128, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(128, 128, 3, padding=1),
        )

    def forward(self, x):
        return self.convs(x).mean((2, 3))


def test_measure_pair_times_both_side_by_side(backend, lowered, data, tmp_path):
    """measure_pair times the two artifacts in the same rounds, alternating blocks of calls.

    Timed one after the other, each would stop on its own: the 1x8x8 model (tens of microseconds a call
    on a CPU) would make thousands of calls in blocks of 50, the heavy one (0.5 ms or more) hundreds, in
    smaller blocks. Timed side by side, both run the blocks the slower one sets, round after
    round: the same count, and the same share of rounds set aside as disturbed.
    """
    _, tiny = lowered
    torch.manual_seed(0)
    heavy = backend.lower(Heavy().eval(), (data[0][:1],), {}, tmp_path)
    a, b = backend.measure_pair(heavy, tiny, (data[0][:1],))
    # (no minimum count: on a busy machine most rounds may be set aside as disturbed, for both alike)
    assert a.n == b.n > 0 and a.disturbed == b.disturbed
    if backend.device == "cpu":  # in argument order: the heavy artifact first (measured: about 30x slower)
        assert a.median_ms > 5 * b.median_ms, (a.median_ms, b.median_ms)


def test_fingerprint_is_structural(backend, lowered, data, tmp_path):
    _, art = lowered
    torch.manual_seed(1)
    other_weights = backend.lower(Tiny().eval(), (data[0][:1],), {}, tmp_path / "w")
    wider = backend.lower(Tiny(width=16).eval(), (data[0][:1],), {}, tmp_path / "x")
    fp = backend.fingerprint(art)
    if fp is None:
        pytest.skip(f"backend {backend.name!r} does not fingerprint artifacts (no latency cache)")
    assert backend.fingerprint(other_weights) == fp  # same graph, dtypes and shapes; other values
    assert backend.fingerprint(wider) != fp


def test_artifact_reloads_with_its_input_shape(backend, lowered):
    _, art = lowered
    again = backend.load_artifact(art.path)
    assert again.size_bytes == art.size_bytes
    (x,) = backend.example_inputs_for(again)
    assert tuple(x.shape) == (1, 1, 8, 8)
