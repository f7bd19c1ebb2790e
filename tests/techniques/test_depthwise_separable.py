"""Depthwise-separable substitution: the rank-1 (rank-m) split is exact on a separable kernel and loses
exactly the discarded singular values otherwise; the pipeline step, the refusals, the space, the
applicability check, the latency profile's rows and the int8 lowering in ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import optuna
import pytest
import torch
from torch import nn

from autocompress.backends import OnnxRuntimeBackend
from autocompress.errors import ConfigError, TechniqueError
from autocompress.finetune_policy import recoverable
from autocompress.inventory import build_inventory
from autocompress.pipeline import compress
from autocompress.plan import LayerPlan, Plan
from autocompress.report import layer_table
from autocompress.search.applicability import check_applicability
from autocompress.search.latency_profile import layer_settings
from autocompress.space import SearchSpace
from autocompress.techniques.depthwise_separable import (
    separable_kernel,
    separable_macs,
    separable_split,
    why_not_separable,
)
from autocompress.testing import PlainCNN, ResNetStyle
from autocompress.testing.technique_suite import reference_task


def _slices(w: torch.Tensor) -> torch.Tensor:
    """The ``C_in x C_out x k^2`` slices of a conv kernel."""
    out, c_in = w.shape[:2]
    return w.reshape(out, c_in, -1).permute(1, 0, 2)


def _separable_conv(c_in: int, c_out: int, k: int, rank: int, **conv) -> nn.Conv2d:
    """A Conv2d whose every input channel's ``C_out x k^2`` slice has rank ``rank`` by construction."""
    layer = nn.Conv2d(c_in, c_out, k, **conv)
    with torch.no_grad():
        u, v = torch.randn(c_in, c_out, rank), torch.randn(c_in, rank, k * k)
        layer.weight.copy_((u @ v).permute(1, 0, 2).reshape(c_out, c_in, k, k))
    return layer


@pytest.mark.parametrize(
    ("multiplier", "conv"),
    [
        (1, {"stride": 2, "padding": 1}),
        (1, {"padding": 2, "dilation": 2, "bias": False}),
        (2, {"padding": 1, "padding_mode": "reflect"}),
    ],
)
def test_split_is_exact_on_a_kernel_separable_by_construction(multiplier, conv):
    torch.manual_seed(0)
    layer = _separable_conv(6, 10, 3, multiplier, **conv).eval()
    split = separable_split(layer, multiplier).eval()
    dw, pw = split
    assert (dw.groups, dw.in_channels, dw.out_channels, dw.kernel_size) == (6, 6, 6 * multiplier, (3, 3))
    assert (dw.stride, dw.padding, dw.dilation, dw.bias) == (
        layer.stride,
        layer.padding,
        layer.dilation,
        None,
    )
    assert pw.kernel_size == (1, 1) and (pw.bias is None) == (layer.bias is None)
    x = torch.randn(2, 6, 13, 13)
    with torch.no_grad():
        np.testing.assert_allclose(split(x).numpy(), layer(x).numpy(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("multiplier", [1, 2])
def test_split_error_is_the_discarded_singular_values(multiplier):
    torch.manual_seed(1)
    layer = nn.Conv2d(5, 8, 3, padding=1).double()
    split = separable_split(layer, multiplier)
    s = torch.linalg.svdvals(_slices(layer.weight.detach()))
    err = ((separable_kernel(split) - layer.weight) ** 2).sum().item()
    assert err == pytest.approx((s[:, multiplier:] ** 2).sum().item(), rel=1e-10)
    assert err > 0.1  # a random kernel is not separable: the split is an approximation
    # the truncated SVD is the least-squares optimum: a perturbed split is worse
    with torch.no_grad():
        split[0].weight.add_(1e-3 * torch.randn_like(split[0].weight))
    assert ((separable_kernel(split) - layer.weight) ** 2).sum().item() > err
    x = torch.randn(1, 5, 9, 9, dtype=torch.float64)  # the split computes the conv of its own kernel
    with torch.no_grad():
        dense = nn.functional.conv2d(x, separable_kernel(split), layer.bias, padding=1)
        np.testing.assert_allclose(split(x).numpy(), dense.numpy(), atol=1e-10)


def test_ineligible_layers_say_why():
    assert why_not_separable(nn.Conv2d(8, 8, 1), 1) == "not separable: a 1x1 kernel is already pointwise"
    assert why_not_separable(nn.Conv2d(8, 8, 3, groups=8), 1) == (
        "not separable: depthwise/grouped conv (groups=8)"
    )
    assert why_not_separable(nn.Linear(4, 4), 1) == "not separable: Linear (only a standard nn.Conv2d is)"
    # one output channel: 1 * 4 * (9 + 1) = 40 MACs against 4 * 9 = 36
    assert separable_macs(nn.Conv2d(4, 1, 3), 1) == (36, 40)
    assert (
        why_not_separable(nn.Conv2d(4, 1, 3), 1) == "not separable: multiplier 1 gives 40 MACs >= original 36"
    )
    assert why_not_separable(nn.Conv2d(4, 16, 3), 4) is None  # 4 * 4 * 25 = 400 < 576
    with pytest.raises(TechniqueError, match="needs an nn.Conv2d with groups=1"):
        separable_split(nn.Conv2d(8, 8, 3, groups=8))
    with pytest.raises(TechniqueError, match="multiplier 0 must be >= 1"):
        separable_split(nn.Conv2d(8, 8, 3), 0)


def test_pipeline_substitutes_and_the_plan_fine_tunes():
    task = reference_task("plain_cnn")
    teacher = task.model_fn().eval()
    plan = Plan(layers={"features.0": LayerPlan(separable=1), "features.3": LayerPlan(separable=2)}, epochs=0)
    out = compress(task, teacher, plan)
    assert out.notes == {
        "features.0": "depthwise-separable x1: MACs 432 -> 75",
        "features.3": "depthwise-separable x2: MACs 4608 -> 1312",
    }
    assert [n for n in out.layer_bits] == [
        "features.0.0",
        "features.0.1",
        "features.3.0",
        "features.3.1",
        "classifier",
    ]
    assert out.model.features[3][0].out_channels == 32 and out.model.features[3][0].groups == 16
    assert recoverable(teacher, out.model, plan)  # fewer weights: a hands-off study fine-tunes it
    x = task.test[0][:4]
    assert out.model(x).shape == teacher(x).shape


def test_separable_with_low_rank_is_refused_and_never_asked():
    with pytest.raises(
        ConfigError, match=r"layers\.c\.separable: separable 1 and rank_ratio 0\.5 both replace"
    ):
        Plan(layers={"c": LayerPlan(separable=1, rank_ratio=0.5)})
    model = PlainCNN().eval()
    inventory = build_inventory(model, PlainCNN.example_inputs())
    space = SearchSpace.from_dict(
        {"separable": {"choices": [0, 1, 2]}, "rank_ratio": {"choices": [0.5, 1.0]}}
    )
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(12):
        trial = study.ask()
        plan = space.suggest(trial, inventory, epochs=0, lr=1e-3, seed=0)
        for name, lp in plan.layers.items():
            assert lp.separable == 0 or lp.rank_ratio == 1.0
            assert (f"sep.{name}" in trial.params) == (
                name != "classifier" and trial.params[f"rank.{name}"] == 1.0
            ), (name, trial.params)
            seen.add(lp.separable)
        study.tell(trial, 0.0)
    assert seen == {0, 1, 2}
    with pytest.raises(ConfigError, match=r"separable: 3 is not one of \[0, 1, 2, 4\]"):
        SearchSpace.from_dict({"separable": {"choices": [0, 3]}})


def test_applicability_keeps_the_eligible_convs_and_profile_rows():
    task = reference_task("resnet")
    teacher = task.model_fn().eval()
    inventory = build_inventory(teacher, task.example_inputs())
    space = SearchSpace.from_dict({"separable": {"choices": [0, 1]}})
    be = OnnxRuntimeBackend(isolate=False)
    try:
        result = check_applicability(task, teacher, inventory, space, be)
    finally:
        be.close()
    checks = {c.layer: c for c in result.checks if c.technique == "depthwise-separable"}
    assert checks["layer2.0.shortcut.0"].status == "no effect"  # a 1x1 conv
    assert result.domains == {"sep.layer2.0.shortcut.0": {"fixed": 0}}
    convs = [i for i in inventory if i.kind == "Conv2d"]
    assert {n for n, c in checks.items() if c.status == "ok"} == {i.name for i in convs if i.kernel != (1, 1)}
    assert "fc" not in checks  # a Linear layer is never asked
    rows = {i.name: [label for label, _ in layer_settings(space, i)] for i in inventory}
    assert (
        rows["layer1.0.conv1"] == ["separable x1"] and rows["layer2.0.shortcut.0"] == [] and rows["fc"] == []
    )


def test_int8_on_a_substituted_model_lowers_to_grouped_convs_and_matches(tmp_path):
    """Whole-model static int8 on top of the substitution: ORT loads the QDQ graph (a grouped Conv per
    depthwise conv) and agrees with torch within the static-int8 tolerance of the conformance suite."""
    task = reference_task("resnet")
    teacher = ResNetStyle().eval()
    layers = {i.name: LayerPlan(separable=1, bits=8) for i in build_inventory(teacher, task.example_inputs())}
    out = compress(task, teacher, Plan(layers=layers, epochs=0))
    be = OnnxRuntimeBackend(isolate=False)
    try:
        art = be.lower(
            out.model, task.example_inputs(), out.lowering, tmp_path, calibration=task.calibration_inputs(64)
        )
        x = task.test[0]
        got = np.asarray(be.runner(art)((x.numpy(),)))
    finally:
        be.close()
    graph = onnx.load(str(art.path)).graph
    groups = sorted(a.i for n in graph.node if n.op_type == "Conv" for a in n.attribute if a.name == "group")
    assert [g for g in groups if g > 1] == [3, 16, 16, 16, 16, 16, 32, 32, 32]  # the 9 substituted convs
    assert any(n.op_type == "DequantizeLinear" for n in graph.node)
    with torch.no_grad():
        ref = out.model(x).numpy()
    assert np.mean(got.argmax(1) == ref.argmax(1)) >= 0.9
    assert np.abs(got - ref).max() <= 0.05 * np.abs(ref).max()


def test_the_report_has_a_separable_column():
    plan = Plan(layers={"features.3": LayerPlan(separable=2), "features.0": LayerPlan(bits=8)})
    note = "depthwise-separable x2: MACs 4608 -> 1312"
    study = optuna.create_study(direction="maximize")
    study.add_trial(
        optuna.trial.create_trial(
            value=1.0, user_attrs={"plan": plan.to_dict(), "notes": {"features.3": note}}
        )
    )
    table = layer_table(study).set_index("layer")
    assert table.loc["features.3", "separable"] == 2 and table.loc["features.3", "note"] == note
    assert table.loc["features.0", "separable"] == 0
