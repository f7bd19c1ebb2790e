from __future__ import annotations

import copy
import os
import time

import numpy as np
import onnx
import pytest
import torch
from filelock import FileLock, Timeout
from onnx import TensorProto, numpy_helper
from torch import nn

from autocompress.backends import OnnxRuntimeBackend, device_lock
from autocompress.backends.base import lock_dir
from autocompress.errors import BackendError
from autocompress.inventory import compressible_layers
from autocompress.pipeline import compress
from autocompress.plan import LayerPlan, Plan
from autocompress.techniques import fold_batchnorm, qmax_for, quantize_weight


def _conv_stack(width: int = 64) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, 10),
    ).eval()


@pytest.fixture(scope="module")
def backend():
    be = OnnxRuntimeBackend()
    yield be
    be.close()


def _inits(path):
    return {i.name: i for i in onnx.load(str(path)).graph.initializer}


def test_int8_artifact_holds_int8_weights_that_ort_fuses(tmp_path, backend, digits_task, digits_teacher):
    plan = Plan(layers={n: LayerPlan(bits=8) for n, _ in compressible_layers(digits_teacher)}, epochs=1)
    out = compress(digits_task, digits_teacher, plan, reduce_range=backend.reduce_range)
    art = backend.lower(
        out.model, digits_task.example_inputs(), out.lowering, tmp_path, digits_task.calibration_inputs()
    )
    inits = _inits(art.path)
    # the weights are stored as int8 and hold exactly the QAT integers
    for name, module in compressible_layers(out.model):
        t = inits[f"{name}.weight_quantized"]
        assert t.data_type == TensorProto.INT8
        q, scale = quantize_weight(module.weight.detach(), qmax_for(8, backend.reduce_range))
        stored = numpy_helper.to_array(t)
        np.testing.assert_array_equal(stored, q.numpy().astype(np.int8))
        np.testing.assert_allclose(
            numpy_helper.to_array(inits[f"{name}.weight_scale"]), scale.numpy(), rtol=1e-6
        )
    assert not any(i.data_type == TensorProto.FLOAT and i.name.endswith(".weight") for i in inits.values())
    # the graph ORT actually runs uses int8 kernels for every layer
    assert art.meta["kernels"].get("QLinearConv", 0) == 4
    assert art.meta["kernels"].get("QGemm", 0) + art.meta["kernels"].get("MatMulInteger", 0) == 1
    assert "Conv" not in art.meta["kernels"]
    # the artifact's accuracy is close to the fine-tuned torch model's
    x, y = digits_task.test
    torch_acc = float((out.model(x).argmax(1) == y).float().mean())
    art_acc = backend.evaluate(art, x.numpy(), y.numpy(), digits_task.score)
    assert abs(art_acc - torch_acc) <= 0.03


def test_int8_is_measurably_faster_than_float_on_a_wide_conv_stack(tmp_path):
    """3 convs of 64 channels on 32x32 inputs: ORT's int8 kernels must beat its float ones."""
    model = _conv_stack(64)
    x = torch.rand(64, 3, 32, 32)
    be = OnnxRuntimeBackend(batch_size=1)
    try:
        f32 = be.lower(copy.deepcopy(model), (x[:1],), {}, tmp_path / "f32")
        names = [n for n, _ in compressible_layers(model)]
        q8 = be.lower(copy.deepcopy(model), (x[:1],), {n: 8 for n in names}, tmp_path / "q8", x.numpy())
        lat_q8, lat_f32 = be.measure_pair(q8, f32, (x[:1],))
    finally:
        be.close()
    ratio = lat_q8.median_ms / lat_f32.median_ms
    print(f"int8 / float latency: {ratio:.3f} ({lat_q8.median_ms:.3f} ms vs {lat_f32.median_ms:.3f} ms)")
    assert ratio < 0.85
    assert q8.size_bytes < 0.35 * f32.size_bytes


def test_int4_layers_are_packed_int4_weight_only(tmp_path, backend, digits_task, digits_teacher):
    plan = Plan(
        layers={
            "features.3": LayerPlan(bits=4),
            "features.6": LayerPlan(bits=8),
            "classifier": LayerPlan(bits=4),
        },
        epochs=0,
    )
    out = compress(digits_task, digits_teacher, plan, reduce_range=backend.reduce_range)
    art = backend.lower(
        out.model, digits_task.example_inputs(), out.lowering, tmp_path, digits_task.calibration_inputs()
    )
    model = onnx.load(str(art.path))
    assert {o.domain or "": o.version for o in model.opset_import}[""] >= 21
    inits = {i.name: i for i in model.graph.initializer}
    w4 = inits["features.3.weight_int4"]
    assert w4.data_type == TensorProto.INT4
    assert len(w4.raw_data) == -(-w4.dims[0] * int(np.prod(w4.dims[1:])) // 2)  # two values per byte
    q, _ = quantize_weight(out.model.features[3].weight.detach(), 7)
    np.testing.assert_array_equal(numpy_helper.to_array(w4).astype(np.int32), q.numpy())
    assert inits["features.6.weight_quantized"].data_type == TensorProto.INT8
    assert "features.0.weight" in inits and inits["features.0.weight"].data_type == TensorProto.FLOAT
    x, y = digits_task.test
    assert backend.evaluate(art, x.numpy(), y.numpy(), digits_task.score) > 0.5


def test_float_artifact_matches_the_torch_model(tmp_path, backend, digits_task, digits_teacher):
    model, _ = fold_batchnorm(copy.deepcopy(digits_teacher))
    art = backend.lower(model, digits_task.example_inputs(), {}, tmp_path)
    sess = backend.session(art.path)
    x = digits_task.test[0][:64]
    np.testing.assert_allclose(sess.run(None, {"input": x.numpy()})[0], model(x).detach().numpy(), atol=1e-4)


def test_measure_stops_on_the_confidence_interval_rule_in_a_pinned_worker(
    tmp_path, digits_task, digits_teacher
):
    """On a real ONNX artifact, timing goes on until the median's ~95% CI is within the target, then
    stops: a tight target takes many calls, a loose one stops after the first block. The worker that
    times is pinned to the chosen core."""
    model, _ = fold_batchnorm(copy.deepcopy(digits_teacher))
    art = OnnxRuntimeBackend().lower(model, digits_task.example_inputs(), {}, tmp_path)
    core = max(os.sched_getaffinity(0))
    limits = {"min_s": 0.0, "min_repeats": 20, "max_repeats": 10**7, "max_s": 30.0}
    tight = OnnxRuntimeBackend(pin_core=core, timing={**limits, "target_rel_ci": 0.002})
    try:
        t0 = time.perf_counter()
        st = tight.measure(art, digits_task.example_inputs())
        elapsed = time.perf_counter() - t0
        assert os.sched_getaffinity(tight._worker._proc.pid) == {core}  # the timing process was pinned
    finally:
        tight.close()
    assert st.rel_ci <= 0.002 and elapsed < 25, (st, elapsed)  # met, long before max_s
    assert st.rel_ci == pytest.approx(1.57 * st.iqr_ms / np.sqrt(st.n) / st.median_ms, rel=1e-6)
    loose = OnnxRuntimeBackend(isolate=False, timing={**limits, "target_rel_ci": 0.05})
    quick = loose.measure(art, digits_task.example_inputs())
    assert quick.rel_ci <= 0.05 and quick.n < st.n, (quick.n, st.n)


def test_the_timing_worker_ends_at_once_when_closed(tmp_path, digits_task, digits_teacher):
    """A worker started ahead (``start_timing``) and never asked is killed on close, not waited for
    while it imports; one that timed exits within a fraction of a second of its input closing (it skips
    the interpreter's teardown), with exit code 0, and leaves no process behind."""
    early = OnnxRuntimeBackend()
    early.start_timing()
    proc = early._worker._proc
    t0 = time.perf_counter()
    early.close()
    assert time.perf_counter() - t0 < 0.5 and proc.returncode == -9, proc.returncode
    model, _ = fold_batchnorm(copy.deepcopy(digits_teacher))
    used = OnnxRuntimeBackend(timing={"max_s": 0.2, "min_s": 0.0, "warmup_s": 0.05})
    art = used.lower(model, digits_task.example_inputs(), {}, tmp_path)
    assert used.measure(art, digits_task.example_inputs()).n > 0
    proc = used._worker._proc
    t0 = time.perf_counter()
    used.close()
    assert time.perf_counter() - t0 < 0.5 and proc.returncode == 0, proc.returncode


def test_device_lock_is_exclusive():
    with device_lock("cpu"), pytest.raises(Timeout):
        FileLock(str(lock_dir() / "cpu.lock"), timeout=0.1).acquire()
    FileLock(str(lock_dir() / "cpu.lock"), timeout=1).acquire()  # free again


def test_backend_errors(tmp_path, backend):
    with pytest.raises(BackendError, match="device 'cuda:0' is not supported"):
        OnnxRuntimeBackend(device="cuda:0")
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(BackendError, match="onnxruntime could not load"):
        backend.session(bad)
