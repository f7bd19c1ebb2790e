"""Plan + Task (+ teacher) -> compressed torch model + lowering spec.

The pipeline names no technique: it runs every step of the registered techniques
(:data:`autocompress.registry.TECHNIQUES`) in their order - built-ins: fold BN (0) > structured pruning,
one shot (10) > low-rank factorization (20) > masks and the channel schedule (30) > fake quantization
(40) > feature hints (50) > encoder feature KD (55) - then fine-tunes with KD while the steps' schedule hooks advance, and
finalizes (masks and fake quantization baked into the weights).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from .deadline import finetune_time_up
from .errors import ConfigError, NonFiniteLoss
from .faults import on_step
from .inventory import layer_kind
from .lowering import LoweringSpec
from .plan import Plan
from .registry import TECHNIQUES
from .tasks import Task
from .tasks.data import deployable
from .techniques import distill_loss
from .techniques._build import Build
from .training import finetune_steps, steps_per_epoch, train_teacher  # noqa: F401 - re-exported


@dataclass
class Compressed:
    """The result of :func:`compress`.

    Attributes:
        model: the finalized model (eval mode, plain weights: no parametrizations left).
        layer_bits: effective module name -> bits (factorized layers appear as ``name.0``/``name.1``).
        sparsity: effective module name -> final sparsity of its weight.
        notes: layer name -> why a planned step was skipped (e.g. factorization that cannot pay off).
        losses: mean training loss per epoch.
        channel_steps: iterative structured pruning: (progress, layer -> output channels) after each step.
        train_s: seconds spent in the fine-tuning loop itself (the rest of compress() is technique set-up).
        steps_done: the optimizer steps taken (fewer than planned when the fine-tune's time ran out:
            :func:`.deadline.finetune_time`).
        lowering: what ``Backend.lower`` needs besides the model (per layer: bits, static or dynamic, the
            trained weight grid; the activation calibration).
    """

    model: nn.Module
    layer_bits: dict[str, int]
    sparsity: dict[str, float]
    notes: dict[str, str] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)
    channel_steps: list[tuple[float, dict[str, int]]] = field(default_factory=list)
    train_s: float = 0.0
    lowering: LoweringSpec = field(default_factory=LoweringSpec)
    steps_done: int = 0


def compress(
    task: Task,
    teacher: nn.Module,
    plan: Plan,
    *,
    reduce_range: bool = False,
    threads: int | None = None,
    batch_size: int = 64,
    round_to: int | None = None,
    on_epoch: Callable[[int, float, nn.Module], None] | None = None,
) -> Compressed:
    """Build the compressed model that ``plan`` describes, starting from ``teacher``.

    Every registered technique step runs in order on a copy of the teacher; then fine-tuning with KD
    while the sparsity schedule advances; then finalize.

    ``on_epoch(epoch, mean_loss, student)`` is called after each fine-tuning epoch with the model as it
    trains (fake quantization and masks on); it may raise to stop the fine-tune (e.g. a pruned trial).

    Args:
        round_to: channel multiple the backend prefers; structured pruning keeps counts a multiple of it.

    Raises:
        NonFiniteLoss: the fine-tuning loss became NaN or infinite.
        TrialTimeout: the trial's wall-time limit passed during fine-tuning.
    """
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(plan.seed)
    teacher = teacher.eval()
    plan, notes = _for_kinds(plan, teacher)
    build = Build(
        task,
        teacher,
        plan,
        copy.deepcopy(teacher),
        total=finetune_steps(task, plan, batch_size),
        reduce_range=reduce_range,
        round_to=round_to,
        notes=notes,
    )
    try:
        for _, _, step in TECHNIQUES.steps():
            step(build)
        ts = deployable(teacher, task.io)
        ds = deployable(build.student, task.io)  # shares every module with the student: train/eval through it
        t_train = time.perf_counter()
        losses, steps_done = _finetune(build, ts, ds, batch_size, on_epoch) if build.total else ([], 0)
        ds.eval()
        train_s = time.perf_counter() - t_train
        for hook in build.trained:
            hook()
    finally:
        for hook in build.cleanup:
            hook()
    build.advance(1.0, training=False)
    for hook in build.finish:
        hook()
    for m in build.modules.values():
        if parametrize.is_parametrized(m, "weight"):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
    student = build.student.eval()
    sparsity = {n: float((m.weight == 0).sum()) / m.weight.numel() for n, m in build.modules.items()}
    lowering = LoweringSpec(dict(build.lowering), build.calibration)
    return Compressed(
        student,
        dict(build.layer_bits),
        sparsity,
        build.notes,
        losses,
        build.channel_steps,
        train_s,
        lowering,
        steps_done,
    )


def _for_kinds(plan: Plan, teacher: nn.Module) -> tuple[Plan, dict[str, str]]:
    """The plan with each layer's fields that do not apply to its kind at their defaults (an embedding
    table takes its bits only), and a note on each layer that had such fields set: not applied."""
    modules = dict(teacher.named_modules())
    layers, notes = dict(plan.layers), {}
    for name, lp in plan.layers.items():
        kind = layer_kind(modules[name]) if name in modules else None
        if kind is None:
            continue
        layers[name], dropped = lp.for_kind(kind)
        if dropped:
            kept = [d.name for d in TECHNIQUES.dims() if d.applies(kind)]
            notes[name] = f"{', '.join(dropped)} not applied: {kind} layers take {', '.join(kept)} only"
    if not notes:
        return plan, notes
    return dataclasses.replace(plan, layers=layers), notes


def _finetune(
    build: Build,
    ts: nn.Module,
    ds: nn.Module,
    batch_size: int,
    on_epoch: Callable[[int, float, nn.Module], None] | None,
) -> tuple[list[float], int]:
    """``build.total`` optimizer steps of distillation from ``ts`` into ``ds`` (fewer when the fine-tune's
    time runs out: :func:`.deadline.finetune_time`); the mean loss of each epoch and the steps taken.

    Every ``total // 50`` steps the techniques' schedule hooks advance (:meth:`Build.advance`); when layers
    got physically smaller the optimizer starts afresh over the new parameters.
    """
    task, plan, total, student = build.task, build.plan, build.total, build.student

    def make_optimizer() -> torch.optim.Optimizer:
        trainable = [p for p in student.parameters() if p.requires_grad]
        extra = [p for params in build.parameters for p in params()]
        return torch.optim.Adam(trainable + extra, lr=plan.lr)

    loss_kind = task.loss_kind()
    losses: list[float] = []
    every = max(1, total // 50)
    opt = make_optimizer()
    gen = torch.Generator().manual_seed(plan.seed)
    step = epoch = 0
    while step < total and not (step and finetune_time_up()):
        ds.train()
        running, n_batches = 0.0, 0
        for inputs, targets in task.train_split.batches(generator=gen, batch_size=batch_size):
            if step >= total or (n_batches and finetune_time_up()):  # the schedule ends after: advance(1.0)
                break
            if step % every == 0 and build.advance(step / total):
                opt = make_optimizer()  # a physical change: new parameters, fresh optimizer state
                ds.train()
            if plan.lr_schedule != "constant":
                for group in opt.param_groups:
                    group["lr"] = plan.lr_at(step / total)
            with torch.no_grad():
                t_out = ts(*inputs)
            loss = distill_loss(loss_kind, ds(*inputs), t_out, targets, plan.kd_temperature, plan.kd_alpha)
            for term in build.loss_terms:
                loss = loss + term()
            loss = on_step(step, loss)  # deadline check (trials.trial_timeout_s) + test fault hooks
            if not torch.isfinite(loss):
                raise NonFiniteLoss(f"non-finite fine-tuning loss at step {step} (epoch {epoch + 1})")
            opt.zero_grad()
            loss.backward()
            opt.step()
            running += loss.item()
            n_batches += 1
            step += 1
        if n_batches == 0:
            raise ConfigError("task.train yielded no batch", field="task")
        losses.append(running / n_batches)
        if on_epoch:
            on_epoch(epoch, losses[-1], student)
        epoch += 1
    return losses, step
