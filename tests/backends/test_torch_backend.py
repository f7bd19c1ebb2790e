"""The torch backend: devices, dtypes, options and the safe loading of its artifact."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import threading
import time
import zipfile

import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT
from torch import nn

from autocompress.backends import TorchBackend
from autocompress.backends.torch_backend import native_dtype_problem, safe_load_program
from autocompress.config import load_config
from autocompress.errors import BackendError, ConfigError, MissingDependencyError
from autocompress.search.run_setup import prepare


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 10)).eval()


X = torch.rand(16, 1, 8, 8)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    be = TorchBackend(isolate=False)
    return be.lower(_model(), (X[:1],), {}, tmp_path_factory.mktemp("torch"))


@pytest.mark.skipif(importlib.util.find_spec("torch_npu") is not None, reason="torch_npu is installed here")
def test_npu_without_torch_npu_names_what_to_install():
    with pytest.raises(MissingDependencyError, match=r"needs torch_npu .*pip install torch-npu.*CANN"):
        TorchBackend(device="npu:0")
    assert "pip install torch-npu" in TorchBackend.unavailable_reason("npu:0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(BackendError, match=r"device 'cuda:0' is not usable here: .*sees no CUDA device"):
        TorchBackend(device="cuda:0")


def test_bad_device_dtype_and_options_are_refused():
    with pytest.raises(BackendError, match="unknown device kind 'tpu'"):
        TorchBackend(device="tpu:0")
    with pytest.raises(BackendError, match=r"device 'cuda:x' is not of the form"):
        TorchBackend(device="cuda:x")
    with pytest.raises(BackendError, match=r"unknown option\(s\) \['fast'\]; known: compile, dtype"):
        TorchBackend(fast=True)
    with pytest.raises(BackendError, match="dtype 'int8' is not one of float32, float16, bfloat16"):
        TorchBackend(dtype="int8")
    if native_dtype_problem("cpu", "float16"):
        with pytest.raises(BackendError, match="dtype float16 does not run natively on cpu .*use float32"):
            TorchBackend(dtype="float16")


def test_quantized_layers_are_refused_honestly(tmp_path):
    with pytest.raises(
        BackendError, match=r"stores float weights only \(stored: 32\); layers \['0'\] ask for \[8\]"
    ):
        TorchBackend().lower(_model(), (X[:1],), {"0": 8}, tmp_path)


def test_study_validation_rejects_bits_the_backend_cannot_store(tmp_path):
    study = tmp_path / "s.yaml"
    study.write_text(
        yaml.safe_dump(
            {
                "name": "t",
                "task": {"name": "digits"},
                "space": {"file": str(ROOT / "autocompress/search_spaces/default.yaml")},
                "backend": {"name": "torch"},
                "output": str(tmp_path / "run"),
            }
        )
    )
    with pytest.raises(
        ConfigError, match=r"bits: 4 is not allowed by backend 'torch' \(native: 32; stored: 32\)"
    ):
        prepare(load_config(study))
    ok = load_config(study, {"space.overrides": {"bits": {"fixed": 32}}})
    assert prepare(ok).backend.name == "torch"


def test_artifact_is_an_export_program_with_a_dynamic_batch(artifact):
    be = TorchBackend(isolate=False)
    seen = []
    be.evaluate(artifact, X.numpy(), np.zeros(16), lambda logits, y: seen.append(logits) or 0.0)
    with torch.no_grad():
        np.testing.assert_allclose(seen[0], _model()(X).numpy(), atol=1e-5)
    assert artifact.path.suffix == ".pt2" and artifact.meta["dtype"] == "float32"


def test_pickled_payloads_are_refused(artifact, tmp_path):
    bad = tmp_path / "bad.pt2"
    with zipfile.ZipFile(artifact.path) as src, zipfile.ZipFile(bad, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith("weights_config.json"):
                cfg = json.loads(data)
                next(iter(cfg["config"].values()))["use_pickle"] = True
                data = json.dumps(cfg).encode()
            dst.writestr(item, data)
    with pytest.raises(BackendError, match="refusing a pickled payload"):
        safe_load_program(bad)
    not_zip = tmp_path / "x.pt2"
    not_zip.write_bytes(b"junk")
    with pytest.raises(BackendError, match="is not a torch.export archive"):
        safe_load_program(not_zip)
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ


def test_in_process_timing_pinned_to_a_core_restores_the_affinity(artifact):
    before = os.sched_getaffinity(0)
    if len(before) < 2:
        pytest.skip(f"this process may run on {len(before)} core only: pinning to one is not observable")
    core = max(before)
    tid = threading.get_native_id()  # the timing thread (in-process timing runs in this one)
    seen: set[frozenset[int]] = set()
    done = threading.Event()

    def watch():  # the affinity of the timing thread, as the kernel reports it, while it times
        while not done.is_set():
            seen.add(frozenset(os.sched_getaffinity(tid)))
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        be = TorchBackend(isolate=False, pin_core=core, timing={"max_s": 0.5, "min_repeats": 50})
        st = be.measure(artifact, (X[:1],))
    finally:
        done.set()
        watcher.join()
    assert st.n >= 50
    assert frozenset({core}) in seen, seen  # pinned while timing ...
    assert os.sched_getaffinity(0) == before  # ... and restored afterwards


def test_compile_option_runs_the_same_program(artifact):
    from torch._dynamo.eval_frame import OptimizedModule
    from torch._dynamo.utils import counters

    be = TorchBackend(isolate=False, compile=True)
    graphs = counters["stats"]["unique_graphs"]
    seen = []
    be.evaluate(artifact, X.numpy(), np.zeros(16), lambda logits, y: seen.append(logits) or 0.0)
    np.testing.assert_allclose(seen[0], copy.deepcopy(_model())(X).detach().numpy(), atol=1e-4)
    assert isinstance(be.module(artifact.path), OptimizedModule)
    assert counters["stats"]["unique_graphs"] > graphs  # dynamo captured (and compiled) a graph
    plain = TorchBackend(isolate=False)
    assert not isinstance(plain.module(artifact.path), OptimizedModule)
