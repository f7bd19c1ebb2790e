"""When a trial fine-tunes, and for how long: post-training first, fine-tuning only where it pays.

``finetune.when``:

* ``always``: every plan that fine-tunes is fine-tuned (with ``finetune.keep_better``, the post-training
  model is kept when it scores better on the held-out part);
* ``missed_budget``: the post-training model (the plan with no optimizer steps: quantization calibrated,
  pruning and low rank applied) is scored on the held-out part first; it is kept as it is when it meets
  the study's metric budget there, or when fine-tuning has nothing to recover (the plan removes no
  weights: quantization alone); else the plan is fine-tuned and the better of the two is kept;
* ``auto`` (the default): ``missed_budget`` when the study sets neither ``finetune.epochs`` nor
  ``finetune.steps`` (a hands-off study), else ``always``.

Hands-off lengths (:func:`time_steps`): the fine-tune of one trial gets at most
:data:`FINETUNE_SHARE` of the time each trial has (``trials.timeout_s`` / ``trials.n``), at the step time
measured before the search, so that the study finishes its trials in the time it was given. The learning
steps of each fine-tuned trial are then decided when it starts (:func:`rolling_steps`): an equal share of
the fine-tune time the run has left among the trials still to run, so that the time the post-training
trials did not spend goes to the plans that need it. The learning
rate of a pretrained model is small (:func:`auto_lr`): a fine-tune at the rate that trains a model from
scratch moves a pretrained one away from what made it good.
"""

from __future__ import annotations

from torch import nn

from .inventory import compressible_layers
from .pareto import metric_drop, relative_drop
from .plan import Plan

WHEN = ("auto", "always", "missed_budget")
FINETUNE_SHARE = 0.5  # of one trial's share of trials.timeout_s that its fine-tune may take
MIN_STEPS = 10  # fewer steps than this recover nothing: the plan is then not fine-tuned
FINETUNE_SLACK = 1.2  # a fine-tune may run this much past its steps' estimated time, then it stops
MAX_GROWTH = 4  # a trial's rolling share is at most this many times the steps planned at set-up


def within_budget(score: float, reference: float, sign: int, budgets) -> bool | None:
    """Whether ``score`` is within the study's metric budgets of ``reference`` (None: no metric budget)."""
    limits = []
    drop = metric_drop(score, reference, sign)
    if budgets.max_metric_drop is not None:
        limits.append(drop <= budgets.max_metric_drop)
    if budgets.max_metric_drop_rel is not None:
        limits.append(relative_drop(drop, reference) <= budgets.max_metric_drop_rel)
    if not limits:
        return None
    return score == score and all(limits)


def recoverable(teacher: nn.Module, post: nn.Module, plan: Plan) -> bool:
    """Whether fine-tuning has something to recover: the post-training model's layers have fewer
    weights than the teacher's (structured removal, heads, layers, low rank), the plan zeroes some (sparsity)
    or replaces softmax attention by linear attention (a structural change). Rounding to a few bits also
    zeroes weights; that is quantization, not removal."""
    sparse = any((getattr(lp, "sparsity", 0.0) or 0.0) > 0 for lp in plan.layers.values())
    linear = any(getattr(lp, "attention", "softmax") == "linear" for lp in plan.layers.values())
    return _weights(post) < _weights(teacher) or sparse or linear


def _weights(model: nn.Module) -> int:
    """Weight elements of the compressible layers (biases left out: folding BatchNorm adds some)."""
    return sum(m.weight.numel() for _, m in compressible_layers(model))


def skip_reason(
    post_score: float, reference: float, sign: int, budgets, can_recover: bool, metric_name: str
) -> str | None:
    """Why a plan is not fine-tuned under ``missed_budget`` (None: fine-tune it)."""
    verdict = within_budget(post_score, reference, sign, budgets)
    if verdict:
        return (
            f"post-training {metric_name} {post_score:.4f} on the held-out part meets the budget "
            f"(teacher {reference:.4f})"
        )
    if not can_recover:
        return "the plan removes no weights (quantization alone): fine-tuning has nothing to recover"
    return None


def auto_lr(model: nn.Module, pretrained: bool) -> float:
    """The fine-tuning learning rate (Adam) of a study that does not set one: 1e-3 for a model trained
    here (``model_fn``); for a pretrained model, smaller the larger it is (3e-4 under 1M parameters,
    1e-4 under 10M, else 3e-5)."""
    if not pretrained:
        return 1e-3
    n = sum(p.numel() for p in model.parameters())
    return 3e-4 if n < 1_000_000 else 1e-4 if n < 10_000_000 else 3e-5


def time_steps(timeout_s: float | None, n_trials: int, other_s: float, step_s: float) -> int | None:
    """The fine-tune steps one trial can afford within ``trials.timeout_s`` (None: no time limit).

    Each trial has ``timeout_s / n_trials``; its fine-tune gets :data:`FINETUNE_SHARE` of it after the
    rest of the trial (``other_s``: building, lowering, scoring, timing, the post-training model); 0 when
    that leaves fewer than :data:`MIN_STEPS` steps."""
    if not timeout_s or step_s <= 0:
        return None
    per_trial = timeout_s / max(1, n_trials)
    steps = int(max(0.0, FINETUNE_SHARE * per_trial - other_s) / step_s)
    return steps if steps >= MIN_STEPS else 0


def rolling_steps(
    planned: int,
    remaining_s: float | None,
    trials_left: int | None,
    other_s: float,
    step_s: float,
    trial_timeout_s: float | None = None,
) -> int:
    """The fine-tune steps of the trial starting now under a run-wide wall-time budget.

    The fine-tune time left (``remaining_s`` less ``other_s`` for each of the ``trials_left`` trials,
    this one included) is shared equally among those trials: post-training trials spend none of their
    share, so the plans fine-tuned later get what the earlier ones left. At most :data:`MAX_GROWTH` x
    ``planned`` (the study's length before any time cap), within ``trial_timeout_s`` where one is set; 0 when fewer
    than :data:`MIN_STEPS` fit. ``planned`` unchanged without a budget (no run clock, or no count of
    the trials left: a worker of a shared study).

    When the trials left do not fit the time left at twice ``other_s`` each (16 trials asked for in 20
    minutes: not all of them would run, even post-training), the time is shared among as many as fit so:
    a fine-tuned trial gets at least as long to fine-tune as the rest of a trial takes. Sharing it among
    all of them gave every fine-tune 0 steps, and a plan that removes channels, run untuned, is a trial
    spent for nothing.
    """
    if remaining_s is None or not trials_left or step_s <= 0 or planned <= 0:
        return planned
    fit = int(remaining_s / (2 * other_s)) if other_s > 0 else trials_left
    trials_left = max(1, min(trials_left, fit))
    share = (remaining_s - trials_left * other_s) / trials_left
    if trial_timeout_s:
        share = min(share, FINETUNE_SHARE * trial_timeout_s - other_s)
    steps = min(int(max(0.0, share) / step_s), MAX_GROWTH * planned)
    return steps if steps >= MIN_STEPS else 0
