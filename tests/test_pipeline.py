from __future__ import annotations

import pytest
import torch
from torch import nn

from autocompress.errors import TrialFailed
from autocompress.inventory import build_inventory
from autocompress.pipeline import compress
from autocompress.plan import LayerPlan, Plan, Schedule
from autocompress.tasks import load_task
from autocompress.techniques import qmax_for


def test_inventory_lists_layers_with_params_and_macs(digits_task, digits_teacher):
    inv = build_inventory(digits_teacher, digits_task.example_inputs())
    assert [i.name for i in inv] == ["features.0", "features.3", "features.6", "features.10", "classifier"]
    first, last = inv[0], inv[-1]
    assert (first.kind, first.in_features, first.out_features, first.kernel) == ("Conv2d", 1, 8, (3, 3))
    assert first.params == 8 * 1 * 9 and first.macs == 8 * 8 * 8 * 9  # 8x8 output map, 9 MACs each
    assert (last.kind, last.params, last.macs) == ("Linear", 32 * 10 + 10, 32 * 10)
    assert inv[2].full_rank == 16


def test_compress_applies_every_decision(digits_task, digits_teacher):
    plan = Plan(
        layers={
            "features.0": LayerPlan(bits=32, sparsity=0.5),
            "features.3": LayerPlan(bits=8, sparsity=0.25),
            "features.6": LayerPlan(bits=4, rank_ratio=0.25),
            "classifier": LayerPlan(bits=8),
        },
        schedule=Schedule("cubic", 0.1, 0.6),
        epochs=1,
    )
    out = compress(digits_task, digits_teacher, plan, reduce_range=True)
    model = out.model
    w0 = model.features[0].weight
    assert int((w0 == 0).sum()) == round(0.5 * w0.numel())  # exact final sparsity on a float layer
    w3 = model.features[3].weight
    assert int((w3 == 0).sum()) >= round(0.25 * w3.numel())
    # 8-bit with reduce_range: at most 2*63+1 levels per channel, on the amax/63 grid
    scale = w3.abs().reshape(w3.shape[0], -1).amax(1) / qmax_for(8, True)
    ints = w3.reshape(w3.shape[0], -1) / scale[:, None]
    assert torch.allclose(ints, ints.round(), atol=1e-3)
    # features.6 (16 -> 16, 3x3) at rank 4 is factorized; both factors at 4 bits
    assert isinstance(model.features[6], nn.Sequential)
    assert out.layer_bits["features.6.0"] == 4 and out.layer_bits["features.6.1"] == 4
    assert model.features[6][0].out_channels == 4
    assert max(len(r.unique()) for r in model.features[6][0].weight.detach().reshape(4, -1)) <= 15  # of 144
    for f in model.features[6]:  # each output channel on its own amax/7 grid (16*9 and 4 weights a row)
        rows = f.weight.detach().reshape(f.weight.shape[0], -1)
        assert max(len(r.unique()) for r in rows) <= min(2 * qmax_for(4) + 1, rows.shape[1])
        ints = rows / (rows.abs().amax(1, keepdim=True) / qmax_for(4))
        assert torch.allclose(ints, ints.round(), atol=1e-3)
    assert not any(hasattr(m, "parametrizations") for m in model.modules())
    assert len(out.losses) == 1
    x = digits_task.test[0][:4]
    assert model(x).shape == digits_teacher(x).shape


def test_factorization_that_cannot_pay_off_is_skipped_with_reason(digits_task, digits_teacher):
    plan = Plan(layers={"features.0": LayerPlan(rank_ratio=0.9)}, epochs=0)  # 1->8 channels, fan-in 9
    out = compress(digits_task, digits_teacher, plan)
    assert "features.0" in out.notes and "not applied" in out.notes["features.0"]
    assert isinstance(out.model.features[0], nn.Conv2d)


def test_nan_loss_fails_the_trial():
    task = load_task("tiny_tasks:nan_data")
    teacher = task.model_fn()
    with pytest.raises(TrialFailed, match=r"non-finite fine-tuning loss at step \d+ \(epoch 1\)"):
        compress(task, teacher, Plan(epochs=1))
