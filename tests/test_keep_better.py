"""finetune.keep_better: a trial scores its post-training model and its fine-tuned one on the held-out part
of the training split and keeps the better (real compress, lowering and ONNX Runtime scoring)."""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from autocompress.config import StudyConfig
from autocompress.context import RunContext
from autocompress.holdout import holdout_scores, split_training
from autocompress.objective import _finetuned_wins, build_model
from autocompress.pipeline import compress
from autocompress.plan import LayerPlan, Plan
from autocompress.rundir import build_backend

LAYERS = ["features.0", "features.3", "features.6", "features.10", "classifier"]


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()  # compress(threads=...) sets torch's thread count: leave it as it was
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def backend():
    b = build_backend(StudyConfig.model_validate({"name": "kb", "task": {"name": "digits"}}))
    yield b
    b.close()


def _ctx(task, teacher, backend, **finetune) -> RunContext:
    cfg = StudyConfig.model_validate(
        {"name": "kb", "task": {"name": "digits"}, "finetune": {"epochs": 1, "threads": 1, **finetune}}
    )
    return RunContext(cfg, Path("unused"), task, teacher, [], None, backend)


def _artifact_metric(ctx: RunContext, result, tmp_path: Path) -> float:
    """What run_trial scores: the result lowered by the run's backend, evaluated on the eval split."""
    return ctx.score(ctx.lower(result.model, tmp_path, result.lowering))


def test_harmful_finetune_keeps_the_post_training_model(digits_task, digits_teacher, backend, tmp_path):
    # a loss that trains towards the wrong labels wrecks the int8 model; the post-training int8 one stays
    harm = dataclasses.replace(digits_task, loss=lambda s, t, y: F.cross_entropy(s, (y + 1) % 10))
    ctx = _ctx(harm, digits_teacher, backend)
    plan = Plan(layers={n: LayerPlan(bits=8) for n in LAYERS}, epochs=1, lr=1e-2)
    result, kept, seconds = build_model(ctx, plan)
    assert kept["kept"] == "post_training"
    assert kept["holdout_post_training"] > 0.8 and kept["holdout_finetuned"] < 0.4, kept
    assert set(seconds) == {"post_training", "holdout"}
    assert len(result.losses) == 1  # the fine-tune ran (its losses are recorded) though it was not kept
    # the artifact is the post-training model's: the same metric as the plan built without fine-tuning
    post, _, _ = build_model(ctx, dataclasses.replace(plan, epochs=0))
    assert _artifact_metric(ctx, result, tmp_path / "a") == _artifact_metric(ctx, post, tmp_path / "b")


def test_finetune_that_helps_is_kept(digits_task, digits_teacher, backend, tmp_path):
    # half the channels removed: the post-training model is poor, fine-tuning recovers much of it
    ctx = _ctx(digits_task, digits_teacher, backend)
    plan = Plan(
        layers={n: LayerPlan(sparsity=0.5, sparsity_kind="structured") for n in LAYERS[:-1]}, epochs=1
    )
    result, kept, _ = build_model(ctx, plan)
    assert kept["kept"] == "finetuned"
    assert kept["holdout_finetuned"] > kept["holdout_post_training"] + 0.05, kept
    held = ctx.held_out()
    # the fine-tune on the rest of the training split, rebuilt as a trial builds it
    tuned = compress(
        held.task,
        digits_teacher,
        plan,
        reduce_range=backend.reduce_range,
        threads=1,
        round_to=backend.preferred_channel_multiple,
    )
    for (k, a), b in zip(result.model.state_dict().items(), tuned.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    score = holdout_scores([result.model], held.task, held.split)[0]
    assert score == kept["holdout_finetuned"]


def test_no_comparison_without_finetuning_or_when_switched_off(digits_task, digits_teacher, backend):
    plan = Plan(layers={"classifier": LayerPlan(bits=8)}, epochs=0)
    ctx = _ctx(digits_task, digits_teacher, backend, epochs=0)
    assert ctx.held_out().split is None  # nothing fine-tunes: the whole training split stays
    assert build_model(ctx, plan)[1:] == ({}, {})
    off = _ctx(digits_task, digits_teacher, backend, keep_better=False)
    assert off.held_out().split is None and off.held_out().task is digits_task
    assert build_model(off, dataclasses.replace(plan, epochs=1))[1] == {}


def test_held_out_scores_of_a_metric_that_compares_to_the_teacher(digits_task, digits_teacher):
    task = dataclasses.replace(digits_task, metric="fidelity")
    held = split_training(task, 0.2, seed=0)
    noisy = copy.deepcopy(digits_teacher)
    with torch.no_grad():
        noisy.classifier.weight.add_(torch.randn_like(noisy.classifier.weight))
    same, other = holdout_scores([digits_teacher, noisy], held.task, held.split, digits_teacher)
    assert same == pytest.approx(1.0) and other < 0.99
    with pytest.raises(ValueError, match="pass the teacher"):
        holdout_scores([noisy], held.task, held.split)


def test_ties_keep_the_finetuned_model_and_direction_counts():
    assert _finetuned_wins(0.9, 0.9, +1) and not _finetuned_wins(0.8, 0.9, +1)
    assert _finetuned_wins(0.1, 0.2, -1) and not _finetuned_wins(0.3, 0.2, -1)  # lower is better (mse)
    assert not _finetuned_wins(math.nan, 0.2, +1) and _finetuned_wins(0.1, math.nan, +1)


def test_held_out_part_of_tensors_loaders_and_lists(digits_task):
    x, y = digits_task.train
    held = split_training(digits_task, 0.2, seed=0)
    assert held.split.n_samples() == round(0.2 * len(x)) and len(held.task.train[0]) == len(x) - round(
        0.2 * len(x)
    )
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    as_loader = split_training(dataclasses.replace(digits_task, train=loader), 0.2, seed=0)
    rest = as_loader.task.train
    assert (
        isinstance(rest, DataLoader)
        and rest.batch_size == 32
        and isinstance(rest.sampler, torch.utils.data.RandomSampler)
    )
    assert len(rest.dataset) + as_loader.split.n_samples() == len(x)
    assert set(rest.dataset.indices).isdisjoint(as_loader.split._source.dataset.indices)
    batches = [(x[i : i + 100], y[i : i + 100]) for i in range(0, 1000, 100)]
    as_list = split_training(dataclasses.replace(digits_task, train=batches), 0.2, seed=0)
    assert len(as_list.task.train) == 8 and len(as_list.split) == 2

    class Stream:  # re-iterable, no length: nothing to draw a held-out part from
        def __iter__(self):
            return iter(batches)

    stream = dataclasses.replace(digits_task, train=Stream())
    gen = split_training(stream, 0.2, seed=0)
    assert gen.split is None and gen.task is stream and "a Stream cannot be split" in gen.reason
