"""The backend conformance suite (:mod:`autocompress.testing.backend_suite`) on every registered backend
and device.

By default every registered backend runs on each device kind it declares (``Backend.devices``);
those unavailable here are skipped with the reason. Select with ``--backend NAME[:DEVICE]``
(repeatable), or a device kind alone (``--backend npu`` = every backend that targets npu:0)::

    python -m pytest tests/backends/test_conformance.py --backend torch:cuda:0 --backend onnxruntime:cuda:0
    python -m pytest tests/backends/test_conformance.py --backend npu
"""

from __future__ import annotations

import pytest

from autocompress.testing.backend_suite import BackendConformance, conformance_targets, registered_backend


def pytest_generate_tests(metafunc):
    if "target" in metafunc.fixturenames:
        targets = conformance_targets(metafunc.config.getoption("--backend"))
        metafunc.parametrize("target", targets, ids=[f"{n}:{d}" for n, d in targets], scope="module")


class TestRegisteredBackends(BackendConformance):
    @pytest.fixture(scope="class")
    def backend_factory(self, target):
        name, device = target
        return lambda: registered_backend(name, device)
