"""Bias correction of static int8 convs: the quantized graph's per-channel output means are the float
graph's on the calibration samples, and the artifact still runs QLinearConv kernels."""

from __future__ import annotations

import numpy as np
import onnx
import torch
from torch import nn

import autocompress.backends.ort_quantize as oq
from autocompress.backends.bias_correction import _as_consumed, _channel_means, _session
from autocompress.config import StudyConfig
from autocompress.lowering import LayerLowering, LoweringSpec
from autocompress.rundir import build_backend


class TwoConvs(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 16, 3, padding=1, groups=16)  # depthwise: few weights, a visible shift
        self.c = nn.Conv2d(16, 8, 1)
        with torch.no_grad():
            self.b.weight.mul_(3.0)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x))))).mean((2, 3))


def _lower(tmp, calibration):
    backend = build_backend(StudyConfig.model_validate({"name": "bc", "task": {"name": "digits"}}))
    spec = LoweringSpec({n: LayerLowering(bits=8) for n in ("a", "b", "c")}, "minmax")
    art = backend.lower(TwoConvs().eval(), (torch.randn(1, 3, 12, 12),), spec, tmp, calibration=calibration)
    backend.close()
    return onnx.load(str(art.path))


def _shift(model: onnx.ModelProto, float_model: onnx.ModelProto, feeds) -> float:
    """Largest per-channel mean difference of the convs' outputs, quantized (as consumed) - float."""
    convs = [n.output[0] for n in model.graph.node if n.op_type in ("Conv", "QLinearConv")]
    seen = _as_consumed(model, convs)
    names = [c for c in convs if c in {o for n in float_model.graph.node for o in n.output}]
    q = _session(model, [seen[c] for c in names])
    f = _session(float_model, names)
    worst = 0.0
    for c in names:
        qm = _channel_means([q.run([seen[c]], feed)[0] for feed in feeds])
        fm = _channel_means([f.run([c], feed)[0] for feed in feeds])
        worst = max(worst, float(np.abs(qm - fm).max()))
    return worst


def test_bias_correction_removes_the_int8_mean_shift_of_the_convs(tmp_path, monkeypatch):
    calibration = np.random.default_rng(0).normal(size=(64, 3, 12, 12)).astype(np.float32)
    feeds = oq._feeds(calibration, ["input"])
    captured = {}
    real = oq.correct_biases

    def spy(qmodel, float_path, feeds_, nodes):
        captured["float"] = onnx.load(str(float_path))
        before = onnx.ModelProto()
        before.CopyFrom(qmodel)
        captured["before"] = before
        captured["n"] = real(qmodel, float_path, feeds_, nodes)
        return captured["n"]

    monkeypatch.setattr(oq, "correct_biases", spy)
    corrected = _lower(tmp_path / "on", calibration)
    assert captured["n"] == 3  # every static int8 conv with a bias
    assert "QLinearConv" not in {n.op_type for n in corrected.graph.node}  # QDQ form: fused at load
    before = _shift(captured["before"], captured["float"], feeds)
    after = _shift(corrected, captured["float"], feeds)
    assert before > 1e-3, before
    assert after < 0.5 * before, (before, after)  # one step; the Relu's clip keeps part of the shift


class DeadInput(nn.Module):
    """A conv whose input is almost 0 everywhere (a conv with weights of 1e-9), so its calibrated scale
    times the weight scale is too small for the bias to fit int32 at it."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 4, 1)
        with torch.no_grad():
            self.a.weight.fill_(1e-9)
            self.a.bias.zero_()
            self.b.bias.copy_(torch.tensor([0.5, -0.25, 2.0, 0.0]))

    def forward(self, x):
        return self.b(torch.relu(self.a(x))).mean((2, 3))


def test_a_conv_with_an_almost_zero_input_keeps_its_bias(tmp_path):
    """bias / (x_scale * w_scale) is beyond int32: the bias still reaches the output (it was cast to
    int32 out of range, with a numpy warning, and came out as garbage)."""
    import warnings

    import onnxruntime as ort

    backend = build_backend(StudyConfig.model_validate({"name": "bc", "task": {"name": "digits"}}))
    spec = LoweringSpec({n: LayerLowering(bits=8) for n in ("a", "b")}, "minmax")
    calibration = np.abs(np.random.default_rng(0).normal(size=(16, 3, 8, 8))).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        art = backend.lower(
            DeadInput().eval(), (torch.randn(1, 3, 8, 8),), spec, tmp_path, calibration=calibration
        )
    backend.close()
    out = ort.InferenceSession(str(art.path)).run(None, {"input": calibration[:2]})[0]
    np.testing.assert_allclose(out, np.tile([0.5, -0.25, 2.0, 0.0], (2, 1)), atol=0.01)  # the output grid


def test_a_post_training_student_is_corrected_against_its_weights_before_rounding(tmp_path, monkeypatch):
    """A post-training student holds the teacher's weights already rounded to the int8 grid (its fake
    quantization baked in): the correction compares against the unrounded weights its records keep, so
    the artifact's conv means are the *teacher's*. Compared against the rounded graph it cannot see the
    shift the weights' rounding adds (EfficientNet-Lite0 on MNIST, int8 everywhere, lost 3.38 points with
    it, 0.19 without: ``python benchmarks/real_models.py``, trial 0)."""
    from dataclasses import replace

    from autocompress.backends.onnx_export import export_onnx
    from autocompress.lowering import symmetric_grid

    teacher = TwoConvs().eval()
    with torch.no_grad():  # one large weight per depthwise filter: a coarse grid for the other eight
        teacher.b.weight[:, 0, 0, 0] = 8.0
    student = TwoConvs().eval()
    student.load_state_dict(teacher.state_dict())
    records = {}
    for name in ("a", "b", "c"):
        module = getattr(student, name)
        grid = symmetric_grid(module.weight, 8)
        records[name] = replace(grid, source=module.weight.detach().numpy().copy())
        with torch.no_grad():
            module.weight.copy_(torch.from_numpy(grid.dequantize()).float())
    calibration = np.abs(np.random.default_rng(1).normal(size=(64, 3, 12, 12))).astype(np.float32)
    feeds = oq._feeds(calibration, ["input"])
    example = (torch.randn(1, 3, 12, 12),)
    export_onnx(teacher, example, tmp_path / "teacher.onnx")
    teacher_graph = onnx.load(str(tmp_path / "teacher.onnx"))
    references = []
    real = oq.correct_biases
    monkeypatch.setattr(
        oq, "correct_biases", lambda q, path, *a: references.append(onnx.load(str(path))) or real(q, path, *a)
    )
    backend = build_backend(StudyConfig.model_validate({"name": "bc", "task": {"name": "digits"}}))
    shifts = {}
    for keep in (True, False):
        kept = {n: r if keep else replace(r, source=None) for n, r in records.items()}
        spec = LoweringSpec({n: LayerLowering(bits=8, weight=kept[n]) for n in kept}, "minmax")
        art = backend.lower(student, example, spec, tmp_path / str(keep), calibration=calibration)
        shifts[keep] = _shift(onnx.load(str(art.path)), teacher_graph, feeds)
    backend.close()
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in references[0].graph.initializer}
    np.testing.assert_array_equal(weights["b.weight"], teacher.b.weight.detach().numpy())  # unrounded
    assert shifts[True] < 0.5 * shifts[False], shifts
