"""The lowering spec: what compress tells a backend, as plain data."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from autocompress.lowering import LayerLowering, LoweringSpec, qmax_for, symmetric_grid
from autocompress.pipeline import compress
from autocompress.plan import LayerPlan, Plan
from autocompress.tasks import Task


def test_a_plain_bits_map_becomes_a_static_spec_and_a_spec_passes_through():
    spec = LoweringSpec.coerce({"a": 8, "b": 4, "c": 32})
    assert spec.layer_bits() == {"a": 8, "b": 4, "c": 32} and spec.quantized() == {"a": 8, "b": 4}
    assert spec.layer("a") == LayerLowering(8) and spec.layer("a").mode == "static"
    assert spec.layer("a").scheme == "symmetric" and spec.layer("a").granularity == "channel"
    assert spec.layer("missing").bits == 32 and spec.calibration == "minmax"
    assert LoweringSpec.coerce(spec) is spec
    assert not LoweringSpec.coerce(None) and spec
    eight = spec.only(k for k, b in spec.layer_bits().items() if b == 8)  # a generator is read once
    assert eight.layer_bits() == {"a": 8}


def test_the_fallback_grid_is_the_symmetric_per_channel_min_max_one():
    w = torch.randn(6, 5)
    grid = symmetric_grid(w, 8, reduce_range=True)
    assert grid.scheme == "symmetric" and grid.granularity == "channel" and not grid.zero_point.any()
    assert np.abs(grid.q).max() <= qmax_for(8, True) == 63
    np.testing.assert_allclose(grid.dequantize(), w.numpy(), atol=float(grid.scale.max()) / 2 + 1e-7)


def test_compress_returns_the_spec_and_sets_no_module_attribute():
    torch.manual_seed(0)
    x, y = torch.rand(32, 4), torch.randint(0, 3, (32,))
    task = Task(
        name="toy",
        model_fn=lambda: nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)),
        train=(x, y),
        test=(x, y),
    )
    layers = {"0": LayerPlan(bits=8, quant_mode="dynamic"), "2": LayerPlan(bits=4, quant_scheme="asymmetric")}
    out = compress(task, task.model_fn().eval(), Plan(layers=layers, epochs=0, calibration="percentile"))
    spec = out.lowering
    assert spec.layer_bits() == out.layer_bits == {"0": 8, "2": 4} and spec.calibration == "percentile"
    assert spec.layer("0").mode == "dynamic" and spec.layer("2").mode == "static"
    assert spec.layer("2").scheme == "asymmetric" and spec.layer("2").weight.bits == 4
    np.testing.assert_allclose(
        spec.layer("2").weight.dequantize(), out.model[2].weight.detach().numpy(), atol=1e-6
    )
    assert not [k for m in out.model.modules() for k in vars(m) if k.startswith("ac_")]
