"""The fine-tuning rate schedule (``finetune.lr_schedule`` -> ``Plan.lr_schedule``)."""

from __future__ import annotations

import math

import pytest
import torch

from autocompress.config import FinetuneConfig
from autocompress.errors import ConfigError
from autocompress.pipeline import compress
from autocompress.plan import LayerPlan, Plan


def test_cosine_rate_falls_from_lr_to_zero():
    plan = Plan(lr=0.01, lr_schedule="cosine")
    assert plan.lr_at(0.0) == pytest.approx(0.01)
    assert plan.lr_at(0.5) == pytest.approx(0.005)
    assert plan.lr_at(0.25) == pytest.approx(0.01 * (1 + math.cos(math.pi / 4)) / 2)
    assert plan.lr_at(1.0) == pytest.approx(0.0, abs=1e-12)
    assert Plan(lr=0.01).lr_at(0.9) == 0.01  # constant


def test_constant_plans_keep_their_dict_and_fingerprint():
    plan = Plan(layers={"fc": LayerPlan(sparsity=0.5)})
    assert "lr_schedule" not in plan.to_dict()  # plans written before the field: same fingerprint
    cosine = Plan(layers={"fc": LayerPlan(sparsity=0.5)}, lr_schedule="cosine")
    assert cosine.to_dict()["lr_schedule"] == "cosine"
    assert Plan.from_dict(cosine.to_dict()) == cosine
    assert cosine.fingerprint() != plan.fingerprint()


def test_unknown_schedule_is_refused():
    with pytest.raises(ConfigError, match="lr_schedule 'linear' is not one of constant, cosine"):
        Plan(lr_schedule="linear")
    with pytest.raises(ValueError, match="lr_schedule"):
        FinetuneConfig(lr_schedule="step")


def test_cosine_fine_tune_starts_at_lr_and_then_differs(digits_task, digits_teacher):
    """The first step runs at ``lr`` (one step: the same model as a constant rate), later ones lower."""

    def weights(steps: int, schedule: str) -> torch.Tensor:
        plan = Plan(steps=steps, lr=0.01, lr_schedule=schedule, kd_alpha=0.0)
        out = compress(digits_task, digits_teacher, plan)
        return torch.cat([p.detach().flatten() for p in out.model.parameters()])

    assert torch.equal(weights(1, "cosine"), weights(1, "constant"))
    assert not torch.allclose(weights(4, "cosine"), weights(4, "constant"))
