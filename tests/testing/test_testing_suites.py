"""The shipped conformance suites used as a third party would: a backend registered under its own name
passes the backend suite (as pytest tests and as one call), a technique of its own passes the
technique suite, and deliberately broken backends and compressions fail the check that covers them."""

from __future__ import annotations

import dataclasses
import hashlib
import subprocess
import sys

import pytest
import torch

from autocompress.backends import OnnxRuntimeBackend
from autocompress.backends.base import Artifact
from autocompress.plan import LayerPlan, Plan
from autocompress.registry import Registry
from autocompress.testing import PlainCNN
from autocompress.testing import backend_suite as bs
from autocompress.testing import technique_suite as ts


class ThirdPartyOrt(OnnxRuntimeBackend):
    """A backend of someone else's: ONNX Runtime under another name, in its own registry."""

    name = "third_party_ort"
    devices = ("cpu",)

    def __init__(self, device: str = "cpu", batch_size: int = 1, threads: int = 1, **options):
        # times in this process: the timing worker rebuilds a backend from autocompress's own registry
        # by name, where a backend registered elsewhere (here: a test's own registry) is unknown
        super().__init__(device, batch_size, threads, **{"isolate": False, **options})


REGISTRY: Registry = Registry("backend")
REGISTRY.add(ThirdPartyOrt.name, ThirdPartyOrt)


class TestThirdPartyBackend(bs.BackendConformance):
    def make_backend(self):
        return bs.registered_backend("third_party_ort", "cpu", REGISTRY)


def test_targets_and_factory_read_the_given_registry():
    assert bs.conformance_targets([], REGISTRY) == [("third_party_ort", "cpu")]
    assert bs.conformance_targets(["third_party_ort:cpu"], REGISTRY) == [("third_party_ort", "cpu")]
    with pytest.raises(pytest.UsageError, match="unknown backend 'onnxruntime'"):
        bs.conformance_targets(["onnxruntime"], REGISTRY)
    be = bs.registered_backend("third_party_ort", "cpu", REGISTRY)
    assert isinstance(be, ThirdPartyOrt) and (be.batch_size, be.threads) == (1, 1)


def test_run_backend_suite_without_pytest_collection(tmp_path):
    """One call: every check but the two timing ones (run above, as tests), each reported passed."""
    only = [n for n in bs.CHECKS if "measure" not in n and "latency" not in n]
    closed = []

    class Closing(ThirdPartyOrt):
        def close(self):
            closed.append(True)
            super().close()

    assert bs.run_backend_suite(Closing, tmp_path, only=only) == dict.fromkeys(only, "passed")
    assert closed, "run_backend_suite left the backend open"
    with pytest.raises(ValueError, match="unknown backend checks"):
        bs.run_backend_suite(ThirdPartyOrt, tmp_path, only=["lowering"])


def test_a_backend_without_fingerprints_is_skipped_with_the_reason(tmp_path):
    class NoFingerprint(ThirdPartyOrt):
        def fingerprint(self, artifact):
            return None

    out = bs.run_backend_suite(NoFingerprint, tmp_path, only=["fingerprint_is_structural"])
    assert out == {
        "fingerprint_is_structural": "skipped: backend 'third_party_ort' does not fingerprint artifacts "
        "(no latency cache)"
    }


# -- broken backends: the check covering each flaw fails ------------------------------------------------


class NoFloat(ThirdPartyOrt):
    stored_bits = (8,)  # cannot store the float baseline
    native_bits = (8,)


class WrongOutputs(ThirdPartyOrt):
    def runner(self, artifact):
        run = super().runner(artifact)
        return lambda inputs: run(inputs) + 0.5


class WrongSize(ThirdPartyOrt):
    def lower(self, *args, **kwargs) -> Artifact:
        art = super().lower(*args, **kwargs)
        return dataclasses.replace(art, size_bytes=art.size_bytes + 1)


class Unlocked(ThirdPartyOrt):
    def measure(self, artifact, example_inputs):  # times without the device lock
        return self.time_local([artifact], self._feed(example_inputs))[0]


class SwappedPair(ThirdPartyOrt):
    def measure_pair(self, artifact, reference, example_inputs):
        a, b = super().measure_pair(reference, artifact, example_inputs)
        return a, b  # the reference's statistics reported as the artifact's


class WeightFingerprint(ThirdPartyOrt):
    def fingerprint(self, artifact):  # hashes the weights too: no latency cache hit across trials
        return hashlib.sha256(artifact.path.read_bytes()).hexdigest()


class WrongInputShape(ThirdPartyOrt):
    def example_inputs_for(self, artifact):
        return (torch.zeros(2, 1, 8, 8),)


@pytest.mark.parametrize(
    ("cls", "check", "scratch", "message"),
    [
        (NoFloat, bs.check_capabilities_are_declared, False, None),
        (WrongOutputs, bs.check_artifact_agrees_with_torch, False, "Not equal to tolerance"),
        (WrongSize, bs.check_artifact_size_is_its_bytes_on_disk, False, None),
        (Unlocked, bs.check_latency_stats_are_sane_and_timed_under_the_device_lock, True, "never held"),
        (SwappedPair, bs.check_measure_pair_times_both_side_by_side, True, None),
        (WeightFingerprint, bs.check_fingerprint_is_structural, True, "other weights"),
        (WrongInputShape, bs.check_artifact_reloads_with_its_input_shape, False, r"\(2, 1, 8, 8\)"),
    ],
    ids=[
        "NoFloat",
        "WrongOutputs",
        "WrongSize",
        "Unlocked",
        "SwappedPair",
        "WeightFingerprint",
        "WrongInputShape",
    ],
)
def test_each_check_fails_a_backend_with_its_flaw(cls, check, scratch, message, tmp_path):
    backend = cls()
    try:
        case = bs.prepare_case(backend, tmp_path / "case")
        with pytest.raises(AssertionError, match=message):
            if check is bs.check_capabilities_are_declared:
                check(backend)
            else:
                check(case, tmp_path / "scratch") if scratch else check(case)
    finally:
        backend.close()


def test_run_backend_suite_names_the_failed_check(tmp_path):
    with pytest.raises(AssertionError) as info:
        bs.run_backend_suite(
            WrongOutputs, tmp_path, only=["capabilities_are_declared", "artifact_agrees_with_torch"]
        )
    assert "backend conformance check 'artifact_agrees_with_torch' failed for third_party_ort:cpu" in (
        info.value.__notes__
    )


def test_importing_autocompress_testing_does_not_import_pytest():
    code = "import sys, autocompress.testing; assert 'pytest' not in sys.modules, 'pytest imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# -- the technique suite with a technique of one's own -------------------------------------------------


class TestThirdPartyTechnique(ts.TechniqueConformance):
    models = ("plain_cnn", "lstm")
    techniques = {"fp16_weights": lambda i, name: LayerPlan(bits=16)}


def test_technique_suite_fails_a_compression_that_is_not_what_was_planned(tmp_path):
    backend = OnnxRuntimeBackend()
    try:
        case = ts.run_technique_suite(PlainCNN, "unstructured", backend, tmp_path / "a")
        claimed = Plan(layers={n: lp.replace(sparsity=0.7) for n, lp in case.plan.layers.items()})
        with pytest.raises(AssertionError):  # less sparse than planned
            ts.check_unstructured(dataclasses.replace(case, plan=claimed))
        with torch.no_grad():  # the torch model no longer what was lowered
            case.model.classifier.bias += 1.0
        with pytest.raises(AssertionError, match="Not equal to tolerance"):
            ts.check_artifact_agrees(case)
        with pytest.raises(AssertionError, match="neither factorized nor noted"):  # not factorized at all
            ts.check_factorized(case, "ratio")
        with pytest.raises(AssertionError, match="explodes"):  # a third party's own check runs and fails

            def explodes(case):
                raise AssertionError("explodes")

            ts.run_technique_suite(PlainCNN, "int8", backend, tmp_path / "b", extra_checks=(explodes,))
    finally:
        backend.close()
