"""Plan + Task (+ teacher) -> compressed torch model.

Order: fold BN > low-rank factorize > prune (masks) > quantization-aware fine-tune with KD while
the sparsity schedule advances > finalize (masks and fake quantization baked into the weights).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from .errors import ConfigError, NonFiniteLoss, TechniqueError
from .faults import on_step
from .inventory import compressible_layers
from .plan import FLOAT_BITS, Plan
from .tasks import Task
from .tasks.data import deployable
from .techniques import (
    ChannelSchedule,
    FeatureHints,
    add_fake_quant,
    apply_masks,
    distill_loss,
    fold_batchnorm,
    plan_factorization,
    prune_to_widths,
    record_weight_quant,
    set_nm,
    set_sparsity,
    sparsity_at,
    target_width,
)
from .techniques._modules import get_module, set_module
from .techniques.quantize import CALIBRATION_ATTR, MODE_ATTR, RECURRENT
from .training import finetune_steps, steps_per_epoch, train_teacher  # noqa: F401 - re-exported


@dataclass
class Compressed:
    """The result of :func:`compress`.

    Attributes:
        model: the finalized model (eval mode, plain weights: no parametrizations left).
        precisions: effective module name -> bits (factorized layers appear as ``name.0``/``name.1``).
        sparsity: effective module name -> final sparsity of its weight.
        notes: layer name -> why a planned step was skipped (e.g. factorization that cannot pay off).
        losses: mean training loss per epoch.
        channel_steps: iterative structured pruning: (progress, layer -> output channels) after each step.
        train_s: seconds spent in the fine-tuning loop itself (the rest of compress() is technique set-up).
    """

    model: nn.Module
    precisions: dict[str, int]
    sparsity: dict[str, float]
    notes: dict[str, str] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)
    channel_steps: list[tuple[float, dict[str, int]]] = field(default_factory=list)
    train_s: float = 0.0


def _factorize_layers(model: nn.Module, plan: Plan, notes: dict[str, str]) -> dict[str, str]:
    """Apply the plan's ranks; return effective module name -> planned (original) layer name."""
    origin: dict[str, str] = {}
    for name, layer in compressible_layers(model):
        lp = plan.layer(name)
        new, why = plan_factorization(layer, lp.rank_mode, lp.rank_ratio)
        if new is None:
            if lp.rank_ratio < 1.0:
                notes[name] = why
            origin[name] = name
            continue
        set_module(model, name, new)
        for i in range(len(new)):
            origin[f"{name}.{i}"] = name
        notes[name] = why
    return origin


def _structured(
    student: nn.Module, task: Task, plan: Plan, round_to: int | None, notes: dict[str, str]
) -> None:
    """Remove output channels of the layers whose plan says ``structured`` (one shot, before fine-tuning)."""
    ratios = {
        name: plan.layer(name).sparsity
        for name, _ in compressible_layers(student)
        if plan.layer(name).sparsity_kind == "structured" and plan.layer(name).sparsity > 0
    }
    if not ratios:
        return
    modules = dict(student.named_modules())
    widths = {n: target_width(modules[n].weight.shape[0], r, round_to) for n, r in ratios.items()}
    changes = prune_to_widths(
        deployable(student, task.io),
        task.example_inputs(2),
        widths,
        importance=plan.importance,
        round_to=round_to,
        data=_importance_data(task, plan),
    )
    for name in ratios:
        if name in changes:
            notes[name] = f"structured: output channels {changes[name][0]} -> {changes[name][1]}"
        else:
            notes[name] = "structured: not pruned (the layer produces the model output)"
    for name, (before, after) in changes.items():  # coupled layers pruned with their group
        notes.setdefault(name, f"structured (coupled): output channels {before} -> {after}")


def _channel_schedule(
    student: nn.Module, task: Task, plan: Plan, round_to: int | None, origin: dict[str, str]
) -> ChannelSchedule | None:
    """The iterative structured pruning of the layers whose plan says ``structured`` (None if none).

    A factorized layer's output channels are those of its last factor.
    """
    last = {layer: name for name, layer in origin.items()}  # origin lists a layer's factors in order
    final = {
        last[layer]: plan.layer(layer).sparsity
        for layer in dict.fromkeys(origin.values())
        if plan.layer(layer).sparsity_kind == "structured" and plan.layer(layer).sparsity > 0
    }
    if not final:
        return None
    s = plan.schedule
    return ChannelSchedule(
        deployable(student, task.io),
        task.example_inputs(2),
        final,
        s.kind,
        s.start,
        s.end,
        s.steps,
        importance=plan.importance,
        round_to=round_to,
        data=_importance_data(task, plan),
    )


def _importance_data(task: Task, plan: Plan):
    """(inputs, targets) of 256 training samples for the Taylor importance (None for l1 / l2)."""
    return task.train_split.first(256) if plan.importance == "taylor" else None


def _channel_notes(
    channels: ChannelSchedule, plan: Plan, origin: dict[str, str], notes: dict[str, str]
) -> None:
    s, n = plan.schedule, len(channels.history)
    how = f"{s.kind} schedule, {n} step{'s' if n != 1 else ''}"
    for name in channels.final:
        layer = origin.get(name, name)
        if name in channels.changes:
            before, after = channels.changes[name]
            notes[layer] = f"structured ({how}): output channels {before} -> {after}"
        else:
            notes[layer] = f"structured ({how}): not pruned (torch-pruning left the layer as is)"
    for name in channels.skipped:
        notes[origin.get(name, name)] = "structured: not pruned (the layer produces the model output)"
    for name, (before, after) in channels.changes.items():  # coupled layers pruned with their group
        notes.setdefault(
            origin.get(name, name), f"structured (coupled, {how}): output channels {before} -> {after}"
        )


def _drop_broken_nm(modules, nm: set, origin: dict[str, str], notes: dict[str, str]) -> None:
    """After input channels were removed, 2:4 masks need input channels that are still a multiple of 4."""
    for name in sorted(nm):
        c_in = modules[name].weight.shape[1]
        if c_in % 4:
            nm.discard(name)
            with torch.no_grad():
                next(p for p in modules[name].parametrizations.weight if hasattr(p, "mask")).mask.fill_(1.0)
            notes[origin[name]] = f"2:4 dropped from {name}: structured pruning left {c_in} input channels"


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

    Order: fold BN > structured pruning (smaller layers) > low-rank factorization > masks
    (unstructured, 2:4) and fake quantization > fine-tuning with KD while the sparsity schedule
    advances > finalize.

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
    student, _ = fold_batchnorm(copy.deepcopy(teacher))
    notes: dict[str, str] = {}
    total = finetune_steps(task, plan, batch_size)
    iterative = plan.schedule.kind != "one_shot" and total > 0  # structured follows the schedule
    if not iterative:
        _structured(student, task, plan, round_to, notes)
    origin = _factorize_layers(student, plan, notes)
    channels = _channel_schedule(student, task, plan, round_to, origin) if iterative else None
    modules = {name: get_module(student, name) for name in origin}
    bits = {name: plan.layer(layer).bits for name, layer in origin.items()}
    kinds = {name: plan.layer(layer).sparsity_kind for name, layer in origin.items()}
    final_sparsity = {
        name: (plan.layer(layer).sparsity if kinds[name] == "unstructured" else 0.0)
        for name, layer in origin.items()
    }
    nm = _nm_layers(modules, kinds, origin, notes)
    pruned = {n: m for n, m in modules.items() if final_sparsity[n] > 0 or n in nm}
    apply_masks(pruned)
    _fake_quantize(modules, origin, bits, plan, reduce_range)
    recurrent = _recurrent_dynamic(student, plan)
    _note_recurrent_skips(student, plan, notes)

    def update_masks(progress: float) -> None:
        for n, m in pruned.items():
            if n in nm:
                if progress >= s.start:
                    set_nm(m)
            else:
                set_sparsity(m, sparsity_at(s.kind, final_sparsity[n], s.start, s.end, progress, s.steps))

    s = plan.schedule
    losses: list[float] = []
    ts = deployable(teacher, task.io)
    ds = deployable(student, task.io)  # shares every module with ``student``: train/eval go through it
    probe = task.example_inputs(2)
    hints = FeatureHints(teacher, student, list(plan.hints)) if plan.hints and plan.hint_weight > 0 else None
    if hints is not None and total:  # build the adapters on one batch so the optimizer sees them
        with torch.no_grad():
            ts(*probe)
            ds(*probe)
            hints.loss()

    def make_optimizer() -> torch.optim.Optimizer:
        trainable = [p for p in student.parameters() if p.requires_grad]
        return torch.optim.Adam(trainable + (list(hints.parameters()) if hints else []), lr=plan.lr)

    def prune_channels_at(progress: float) -> bool:
        """Iterative structured pruning; True when layers got smaller (parameters are new objects)."""
        if channels is None or not channels.step(progress):
            return False
        _drop_broken_nm(modules, nm, origin, notes)
        if hints is not None:  # widths changed: adapters are rebuilt on one batch
            hints.adapters.clear()
            with torch.no_grad():
                ts(*probe)
                ds(*probe)
                hints.loss()
        return True

    def at_step(progress: float) -> bool:
        changed = prune_channels_at(progress)
        update_masks(progress)
        return changed

    t_train = time.perf_counter()
    if total:
        losses = _finetune(
            task, plan, ts, ds, total, batch_size, hints, make_optimizer, at_step, on_epoch, student
        )
    ds.eval()
    train_s = time.perf_counter() - t_train
    if hints is not None:
        hints.close()
        hints = None
    prune_channels_at(1.0)
    update_masks(1.0)
    if channels is not None:
        _channel_notes(channels, plan, origin, notes)
    for m in modules.values():
        record_weight_quant(m)  # the integers/scales the artifact must hold (LSQ: the learned ones)
        if parametrize.is_parametrized(m, "weight"):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
    student.eval()
    sparsity = {n: float((m.weight == 0).sum()) / m.weight.numel() for n, m in modules.items()}
    steps = channels.history if channels is not None else []
    setattr(student, CALIBRATION_ATTR, plan.calibration)
    return Compressed(student, {**bits, **recurrent}, sparsity, notes, losses, steps, train_s)


def _nm_layers(modules, kinds: dict[str, str], origin: dict[str, str], notes: dict[str, str]) -> set[str]:
    """The layers planned 2:4 whose input channels allow it (the others get a note)."""
    nm = set()
    for name, layer in origin.items():
        if kinds[name] == "2:4":
            c_in = modules[name].weight.shape[1]
            if c_in % 4 == 0:
                nm.add(name)
            else:
                notes[layer] = f"2:4 not applied to {name}: {c_in} input channels are not a multiple of 4"
    return nm


def _fake_quantize(
    modules, origin: dict[str, str], bits: dict[str, int], plan: Plan, reduce_range: bool
) -> None:
    """Fake quantization of each layer below float bits (dynamic int8: Linear only; LSTM/GRU apart)."""
    for name, m in modules.items():
        lp = plan.layer(origin[name])
        if lp.quant_mode == "dynamic" and not isinstance(m, nn.Linear):
            raise TechniqueError(
                f"layers.{origin[name]}.quant_mode: dynamic quantization applies to Linear, LSTM and GRU "
                f"layers, not {type(m).__name__} ({name!r}); use quant_mode 'static'"
            )
        if bits[name] < FLOAT_BITS:
            add_fake_quant(
                m,
                bits[name],
                reduce_range=reduce_range and bits[name] == 8,
                scheme=lp.quant_scheme,
                granularity=lp.quant_granularity,
                lsq=plan.lsq,
            )
            setattr(m, MODE_ATTR, lp.quant_mode)


def _finetune(
    task: Task,
    plan: Plan,
    ts: nn.Module,
    ds: nn.Module,
    total: int,
    batch_size: int,
    hints: FeatureHints | None,
    make_optimizer: Callable[[], torch.optim.Optimizer],
    at_step: Callable[[float], bool],
    on_epoch: Callable[[int, float, nn.Module], None] | None,
    student: nn.Module,
) -> list[float]:
    """``total`` optimizer steps of distillation from ``ts`` into ``ds``; the mean loss of each epoch.

    ``at_step(progress)`` advances the sparsity schedule every ``total // 50`` steps and says whether
    layers got physically smaller (then the optimizer starts afresh over the new parameters).
    """
    loss_kind = task.loss_kind()
    losses: list[float] = []
    every = max(1, total // 50)
    opt = make_optimizer()
    gen = torch.Generator().manual_seed(plan.seed)
    step = epoch = 0
    while step < total:
        ds.train()
        running, n_batches = 0.0, 0
        for inputs, targets in task.train_split.batches(generator=gen, batch_size=batch_size):
            if step >= total:
                break
            if step % every == 0 and at_step(step / total):
                opt = make_optimizer()  # a physical change: new parameters, fresh optimizer state
                ds.train()
            with torch.no_grad():
                t_out = ts(*inputs)
            loss = distill_loss(loss_kind, ds(*inputs), t_out, targets, plan.kd_temperature, plan.kd_alpha)
            if hints is not None:
                loss = loss + plan.hint_weight * hints.loss()
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
    return losses


def _recurrent_dynamic(model: nn.Module, plan: Plan) -> dict[str, int]:
    """LSTM/GRU layers the plan quantizes (dynamic int8 only): name -> 8, marked for the backend.

    Their weights are not fake-quantized during fine-tuning: the backend quantizes them (post-training).
    """
    out = {}
    for name, m in model.named_modules():
        if not isinstance(m, RECURRENT) or name not in plan.layers or plan.layers[name].bits == FLOAT_BITS:
            continue
        if plan.layers[name].quant_mode != "dynamic":
            raise TechniqueError(
                f"layers.{name}: {type(m).__name__} layers are quantized dynamically only "
                f"(quant_mode 'dynamic', bits 8) or kept float (bits 32)"
            )
        setattr(m, MODE_ATTR, "dynamic")
        out[name] = 8
    return out


def _note_recurrent_skips(model: nn.Module, plan: Plan, notes: dict[str, str]) -> None:
    """Low rank and sparsity planned on an LSTM/GRU are not applied (its gates take dynamic int8 only):
    say so in the notes rather than ignore the plan silently."""
    for name, m in model.named_modules():
        lp = plan.layers.get(name) if isinstance(m, RECURRENT) else None
        if lp is None:
            continue
        skipped = ["low rank"] if lp.rank_ratio < 1.0 else []
        if lp.sparsity_kind == "2:4" or lp.sparsity > 0:
            skipped.append(f"{lp.sparsity_kind} sparsity")
        if skipped:
            notes[name] = (
                f"{' and '.join(skipped)} not applied: {type(m).__name__} layers take dynamic int8 only"
            )
