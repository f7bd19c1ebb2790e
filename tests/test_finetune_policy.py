"""Fine-tune only where it pays (finetune.when: missed_budget): post-training first, a plan fine-tuned
only when its held-out metric misses the budget and it removed weights; lengths that fit the time given."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from autocompress.config import Budgets, StudyConfig
from autocompress.context import RunContext
from autocompress.finetune_policy import (
    auto_lr,
    recoverable,
    rolling_steps,
    skip_reason,
    time_steps,
    within_budget,
)
from autocompress.objective import build_model
from autocompress.plan import LayerPlan, Plan
from autocompress.rundir import build_backend
from autocompress.search.defaults import apply_finetune_default, apply_time_budget
from autocompress.tasks import Task

LAYERS = ["features.0", "features.3", "features.6", "features.10", "classifier"]


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def backend():
    b = build_backend(StudyConfig.model_validate({"name": "fp", "task": {"name": "digits"}}))
    yield b
    b.close()


def _ctx(task, teacher, backend, budgets: dict) -> RunContext:
    cfg = StudyConfig.model_validate(
        {
            "name": "fp",
            "task": {"name": "digits"},
            "finetune": {"epochs": 1, "threads": 1, "when": "missed_budget"},
            "budgets": budgets,
        }
    )
    return RunContext(cfg, Path("unused"), task, teacher, [], None, backend)


def test_budget_and_recoverability_rules():
    b = Budgets(max_metric_drop=0.02, max_metric_drop_rel=0.05)
    assert within_budget(0.90, 0.91, 1, b) and not within_budget(0.88, 0.91, 1, b)
    assert not within_budget(float("nan"), 0.91, 1, b)
    assert within_budget(0.105, 0.1, -1, Budgets(max_metric_drop_rel=0.06))  # lower is better: 5% worse
    assert within_budget(0.5, 0.9, 1, Budgets()) is None  # no metric budget: nothing to decide on
    teacher = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
    assert not recoverable(teacher, teacher, Plan(layers={"0": LayerPlan(bits=4)}))
    assert recoverable(teacher, nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 2)), Plan())
    assert recoverable(teacher, teacher, Plan(layers={"0": LayerPlan(sparsity=0.3)}))
    assert "meets the budget" in skip_reason(0.9, 0.91, 1, b, True, "accuracy")
    assert "nothing to recover" in skip_reason(0.5, 0.91, 1, b, False, "accuracy")
    assert skip_reason(0.5, 0.91, 1, b, True, "accuracy") is None
    # 24 trials in 20 minutes: 50 s each, half of it for the fine-tune after 5 s of the rest, 0.1 s a step
    assert time_steps(1200, 24, 5.0, 0.1) == 200
    assert time_steps(120, 24, 5.0, 0.1) == 0 and time_steps(None, 24, 5.0, 0.1) is None
    # 1000 s left for 5 trials (this one included), 20 s of the rest each, 1 s a step: (1000 - 100) / 5
    assert rolling_steps(100, 1000.0, 5, 20.0, 1.0) == 180
    assert rolling_steps(40, 1000.0, 5, 20.0, 1.0) == 160  # at most 4x the steps planned at set-up
    assert rolling_steps(100, 1000.0, 5, 20.0, 1.0, trial_timeout_s=100.0) == 30  # half of 100 s less 20
    # 5 trials of 20 s do not fit 105 s at 40 s each: shared among the 2 that do, (105 - 40) / 2 s each
    assert rolling_steps(100, 105.0, 5, 20.0, 1.0) == 32
    assert rolling_steps(100, 125.0, 3, 20.0, 1.0) == 21  # 3 fit: (125 - 60) / 3 s each
    assert rolling_steps(100, 25.0, 5, 20.0, 1.0) == 0  # one trial's 20 s leave 5 s: fewer than 10 steps
    assert (
        rolling_steps(100, None, 5, 20.0, 1.0) == 100 and rolling_steps(100, 1000.0, None, 20.0, 1.0) == 100
    )
    assert auto_lr(teacher, pretrained=False) == 1e-3 and auto_lr(teacher, pretrained=True) == 3e-4
    assert auto_lr(nn.Linear(2000, 2000), pretrained=True) == 1e-4


def test_a_plan_within_budget_post_training_is_not_fine_tuned(digits_task, digits_teacher, backend):
    ctx = _ctx(digits_task, digits_teacher, backend, {"max_metric_drop": 0.05})
    plan = Plan(layers={n: LayerPlan(bits=8) for n in LAYERS}, epochs=1)
    result, kept, _ = build_model(ctx, plan)
    assert kept["kept"] == "post_training" and "holdout_finetuned" not in kept
    assert "meets the budget" in kept["finetune_skipped"] and result.losses == []


def test_quantization_alone_that_misses_the_budget_is_not_fine_tuned(digits_task, digits_teacher, backend):
    ctx = _ctx(digits_task, digits_teacher, backend, {"max_metric_drop": 0.0})
    # a harsh bit width misses a zero budget; no weight is removed, so there is nothing to recover
    plan = Plan(layers={n: LayerPlan(bits=4) for n in LAYERS[:-1]}, epochs=1)
    result, kept, _ = build_model(ctx, plan)
    assert kept["kept"] == "post_training" and result.losses == []
    assert "nothing to recover" in kept["finetune_skipped"], kept


def test_structured_removal_that_misses_the_budget_is_fine_tuned(digits_task, digits_teacher, backend):
    ctx = _ctx(digits_task, digits_teacher, backend, {"max_metric_drop": 0.01})
    plan = Plan(
        layers={n: LayerPlan(sparsity=0.5, sparsity_kind="structured") for n in LAYERS[:-1]}, epochs=1
    )
    result, kept, seconds = build_model(ctx, plan)
    assert "finetune_skipped" not in kept and kept["kept"] == "finetuned"
    assert kept["holdout_finetuned"] > kept["holdout_post_training"] + 0.05, kept
    assert len(result.losses) == 1 and set(seconds) == {"post_training", "holdout"}


def test_hands_off_defaults_read_the_real_batch_size_and_fit_the_time(digits_teacher):
    x, y = torch.randn(320, 1, 8, 8), torch.randint(0, 10, (320,))
    task = Task(
        name="u",
        model=digits_teacher,
        train=DataLoader(TensorDataset(x, y), batch_size=16),
        eval=[(x[:32], y[:32])],
    )
    cfg = StudyConfig(name="s", task={"name": "t"}, trials={"n": 10, "timeout_s": 100})
    line = apply_finetune_default(cfg, task)
    assert "(20 steps of batch 16 each" in line and "fine-tuned only when it misses the budget" in line
    assert cfg.finetune.when == "missed_budget" and cfg.finetune.lr == 3e-4  # a pretrained model: small
    assert cfg.finetune.epochs == 8  # ~150 steps at 20 a pass
    # 10 trials in 100 s: 10 s each, 5 s of fine-tune after 1 s of the rest at 0.02 s a step: 200 steps
    est = {"finetune": 160 * 0.02, "total": 160 * 0.02 + 1.0, "step_s": 0.02}
    assert apply_time_budget(cfg, est) is None  # the 160 planned steps fit
    tight = cfg.model_copy(deep=True)
    tight.trials.timeout_s = 40.0  # 4 s a trial: (2 - 1) s of fine-tune = 50 steps
    assert "50 steps per fine-tuned trial instead of 160" in apply_time_budget(tight, est)
    assert tight.finetune.steps == 50
    given = StudyConfig(name="s", task={"name": "t"}, finetune={"epochs": 2, "lr": 1e-2})
    assert apply_finetune_default(given, task) is None and given.finetune.when == "always"
    assert apply_time_budget(given, est) is None


def test_a_fine_tuned_trial_gets_its_share_of_the_run_time_left(digits_task, digits_teacher, backend):
    from autocompress.deadline import run_clock

    ctx = _ctx(digits_task, digits_teacher, backend, {"max_metric_drop": 0.01})
    # 1 s of the rest a trial; the study's length before any time cap: 5 steps (0.05 s)
    ctx.trial_estimate = {"finetune": 0.05, "total": 1.05, "step_s": 0.01}
    plan = Plan(layers={n: LayerPlan(sparsity=0.5, sparsity_kind="structured") for n in LAYERS[:-1]}, steps=5)
    ctx.trials_left = 4
    with run_clock(9.0):  # (9 - 4 x 1) / 4 = 1.25 s: 125 steps, capped at 4 x 5
        _, kept, _ = build_model(ctx, plan)
    assert kept["kept"] in ("finetuned", "post_training") and kept["finetune_steps"] == 20, kept
    capped = dataclasses.replace(plan, steps=10)  # set-up capped the length below the study's: the
    ctx.trial_estimate = {"finetune": 2.0, "total": 3.0, "step_s": 0.01}  # share is of the uncapped 200
    with run_clock(9.0):  # (9 - 4 x 1) / 4 = 1.25 s: about 125 steps (less the post-training model's time)
        _, kept, _ = build_model(ctx, capped)
    assert 90 <= kept["finetune_steps"] <= 125, kept
    ctx.trial_estimate = {"finetune": 0.05, "total": 1.05, "step_s": 0.01}
    with run_clock(1.1):  # one trial of 1 s fits, with (1.1 - 1) s to fine-tune: fewer than 10 steps
        _, kept, _ = build_model(ctx, plan)
    assert kept["finetune_skipped"].startswith("no fine-tune time is left"), kept


def test_a_fine_tune_stops_when_its_time_is_spent(digits_task, digits_teacher, backend):
    """Steps that cost more than the set-up's estimate (quantization-aware ones) end the fine-tune at the
    time its share gave it, keeping what it learned, instead of overrunning the trials after it."""
    import time

    from autocompress.deadline import finetune_time
    from autocompress.pipeline import compress

    plan = Plan(layers={n: LayerPlan(bits=8) for n in LAYERS}, steps=100_000)
    t0 = time.perf_counter()
    with finetune_time(0.5):
        out = compress(digits_task, digits_teacher, plan, threads=1, batch_size=32)
    assert 1 <= out.steps_done < 100_000 and time.perf_counter() - t0 < 30
    assert out.losses and all(torch.isfinite(torch.tensor(out.losses)))
    assert not out.model.training
    whole = compress(
        digits_task, digits_teacher, dataclasses.replace(plan, steps=3), threads=1, batch_size=32
    )
    assert whole.steps_done == 3  # no limit: every planned step

    ctx = _ctx(digits_task, digits_teacher, backend, {"max_metric_drop": 0.01})
    ctx.trial_estimate = {"finetune": 0.05, "total": 1.05, "step_s": 1e-5}  # far faster than real steps
    ctx.trials_left = 1
    removal = Plan(
        layers={n: LayerPlan(sparsity=0.5, sparsity_kind="structured") for n in LAYERS[:-1]}, steps=5
    )
    from autocompress.deadline import run_clock

    with run_clock(60.0):  # a share of ~59 s at 1e-5 s a step: capped at 4 x 5000 steps, cut by time
        _, kept, _ = build_model(ctx, dataclasses.replace(removal, steps=5000))
    assert kept["finetune_steps"] == 20_000 and kept["finetune_steps_done"] < 20_000, kept
