"""Fine-tuning lengths and the teacher of a ``model_fn`` task (trained once per run)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from .errors import ConfigError
from .plan import Plan
from .tasks import Task
from .tasks.data import deployable


def train_teacher(task: Task, seed: int = 0, log: Callable[[str], None] | None = None) -> nn.Module:
    """Train the task's ``model_fn`` model from scratch with cross-entropy (once per run, then cached)."""
    torch.manual_seed(seed)
    model = task.model_fn()
    dm = deployable(model, task.io)
    opt = torch.optim.Adam(model.parameters(), lr=task.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, task.teacher_epochs))
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(task.teacher_epochs):
        dm.train()
        for inputs, targets in task.train_split.batches(generator=gen, batch_size=task.batch_size):
            loss = nn.functional.cross_entropy(dm(*inputs), targets)
            if not torch.isfinite(loss):
                raise ConfigError(
                    f"teacher training diverged: non-finite loss in epoch {epoch + 1} "
                    "(check the task's data for NaN/inf)",
                    field="task",
                )
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
        if log:
            log(f"teacher epoch {epoch + 1}/{task.teacher_epochs}: loss {loss.item():.4f}")
    dm.eval()
    return model.eval()


def finetune_steps(task: Task, plan: Plan, batch_size: int) -> int:
    """Optimizer steps of a plan's fine-tune: ``plan.steps``, else epochs x steps per epoch."""
    if plan.steps is not None:
        return plan.steps
    if plan.epochs == 0:
        return 0
    per_epoch = steps_per_epoch(task, batch_size)
    if per_epoch is None:
        raise ConfigError(
            "task.train has no length, so epochs cannot be counted: set finetune.steps", field="finetune"
        )
    return plan.epochs * per_epoch


def steps_per_epoch(task: Task, batch_size: int) -> int | None:
    """Optimizer steps in one pass over the training split (None when its length is unknown)."""
    split = task.train_split
    if split.tensors is not None:
        return math.ceil(len(split.tensors[0]) / batch_size)
    try:
        return len(split)
    except TypeError:
        return None
