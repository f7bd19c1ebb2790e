"""Defaults chosen from the model and its data when a study file leaves them out, so that a study
needs only the task, the backend and the budgets.

* ``finetune.epochs`` (and ``finetune.steps``) not set: as many epochs as make about
  :data:`TARGET_STEPS` optimizer steps at the study's batch size (between 1 and :data:`MAX_EPOCHS`);
  a training split without a length gets ``finetune.steps: TARGET_STEPS``.
* ``space`` not set: the default space file, and for a deep model (more than :data:`GROUP_ABOVE`
  compressible layers) layers of the same role share parameters: a layer's group is its name with the
  block indices replaced (``encoder.layers.3.linear1`` -> ``encoder.layers.*.linear1``), so that a
  12-block encoder is searched as a handful of choices rather than a hundred.
"""

from __future__ import annotations

import re

from ..config import StudyConfig
from ..errors import ConfigError
from ..finetune_policy import MIN_STEPS, auto_lr, time_steps
from ..training import steps_per_epoch

TARGET_STEPS = 150  # optimizer steps of one trial's fine-tune when the study does not say
MAX_EPOCHS = 20
GROUP_ABOVE = 24  # layers above which a study without a space shares parameters by role


def auto_epochs(task, batch_size: int) -> tuple[int | None, int | None]:
    """``(epochs, steps)``: epochs for about :data:`TARGET_STEPS` steps, or (None, steps) without a length."""
    per_epoch = steps_per_epoch(task, batch_size)
    if not per_epoch:
        return None, TARGET_STEPS
    return max(1, min(MAX_EPOCHS, round(TARGET_STEPS / per_epoch))), None


def apply_finetune_default(cfg: StudyConfig, task) -> str | None:
    """Set ``cfg.finetune`` from the model and the data where the study leaves it out; the log line.

    Epochs (or steps) for about :data:`TARGET_STEPS` steps when neither is set; ``when: auto`` resolved
    (:mod:`autocompress.finetune_policy`: ``missed_budget`` for a study that sets no length); the
    learning rate from the model (:func:`~autocompress.finetune_policy.auto_lr`) when not set.

    Raises:
        ConfigError: the study counts epochs (``finetune.epochs`` > 0, no ``steps``) of a training split
            without a length.
    """
    ft = cfg.finetune
    hands_off = not ({"epochs", "steps"} & ft.model_fields_set)
    if not hands_off and ft.steps is None and ft.epochs > 0 and steps_per_epoch(task, ft.batch_size) is None:
        raise ConfigError(
            f"{ft.epochs} epochs cannot be counted: the task's training split has no length; "
            "set finetune.steps instead",
            source=cfg.source,
            field="finetune.epochs",
        )
    update: dict = {}
    if ft.when == "auto":
        update["when"] = "missed_budget" if hands_off else "always"
    parts = []
    if "lr" not in ft.model_fields_set:
        model = task.teacher() if task.pretrained else None
        update["lr"] = auto_lr(model, task.pretrained) if model is not None else ft.lr
        if update["lr"] != ft.lr:
            parts.append(f"learning rate {update['lr']:g} (a pretrained model)")
    if hands_off:
        epochs, steps = auto_epochs(task, ft.batch_size)
        rows = task.train_split.rows_per_batch(ft.batch_size)
        if epochs is None:
            update["steps"] = steps
            parts.insert(0, f"{steps} steps per trial (the training split has no length)")
        else:
            update["epochs"] = epochs
            per_epoch = steps_per_epoch(task, ft.batch_size)
            parts.insert(
                0,
                f"{epochs} epochs per trial ({per_epoch} steps of batch {rows} each, ~{TARGET_STEPS} steps)",
            )
        parts.append("post-training first: a plan is fine-tuned only when it misses the budget")
    cfg.finetune = ft.model_copy(update=update)
    return f"finetune: not set in the study; {'; '.join(parts)}" if parts else None


def apply_time_budget(cfg: StudyConfig, estimate: dict) -> str | None:
    """Cap a hands-off study's fine-tune steps so that its trials fit ``trials.timeout_s`` (see
    :func:`~autocompress.finetune_policy.time_steps`); the log line (None when nothing changed).

    The cap is what a trial is planned with; the local runner then gives each fine-tuned trial its
    share of the time the run has left when it starts
    (:func:`~autocompress.finetune_policy.rolling_steps`), so the cap never goes below
    :data:`~autocompress.finetune_policy.MIN_STEPS`: a plan stays fine-tunable when set-up took
    longer than expected and the post-training trials leave time over."""
    ft = cfg.finetune
    if ft.when != "missed_budget" or not ft.trains() or not estimate.get("step_s"):
        return None
    other = estimate["total"] - estimate["finetune"]
    cap = time_steps(cfg.trials.timeout_s, cfg.trials.n, other, estimate["step_s"])
    planned = round(estimate["finetune"] / estimate["step_s"])
    if cap is None or cap >= planned:
        return None
    cap = max(cap, MIN_STEPS)
    cfg.finetune = ft.model_copy(update={"steps": cap})
    share = cfg.trials.timeout_s / cfg.trials.n
    return (
        f"finetune: {cap} steps per fine-tuned trial instead of {planned}, to fit {cfg.trials.n} trials in "
        f"trials.timeout_s ({share:.0f} s each); each fine-tuned trial gets its share of the time left "
        "when it starts"
    )


def role_of(layer: str) -> str:
    """A layer's name with its block indices as ``*`` (``blocks.3.conv`` -> ``blocks.*.conv``)."""
    return re.sub(r"(?<=\.)\d+(?=\.)|^\d+(?=\.)", "*", layer)


def auto_groups(inventory) -> dict[str, str] | None:
    """``{group: regex}`` sharing parameters among layers of the same role, for deep models (else None)."""
    if len(inventory) <= GROUP_ABOVE:
        return None
    members: dict[str, dict[str, list[str]]] = {}
    for info in inventory:
        members.setdefault(role_of(info.name), {}).setdefault(shape_class(info), []).append(info.name)
    groups: dict[str, str] = {}
    for role, by_shape in members.items():
        if len(by_shape) == 1:  # one kind of layer under this name: the name pattern is the group
            groups[role] = "\\.".join(r"\d+" if p == "*" else re.escape(p) for p in role.split("."))
            continue
        for shape, names in by_shape.items():  # e.g. the 1x1 and the depthwise convs of inverted residuals
            groups[f"{role} ({shape})"] = "|".join(re.escape(n) for n in names)
    return groups


def shape_class(info) -> str:
    """What kind of layer ``info`` is beyond its name: ``depthwise 3x3``, ``Conv2d 1x1``, ``Linear``...
    Layers under one name pattern share parameters only within one class (a depthwise conv quantizes
    and prunes unlike the pointwise conv beside it)."""
    kernel = "x".join(str(k) for k in info.kernel)
    if info.kind.startswith("Conv"):
        if info.groups > 1 and info.groups == info.in_features:
            return f"depthwise {kernel}"
        return f"{info.kind} {kernel}" + (f" groups {info.groups}" if info.groups > 1 else "")
    return info.kind


def apply_space_default(cfg: StudyConfig, space, inventory, task=None) -> str | None:
    """When the study names no space: group a deep model's layers by role, and for a model scored by
    its fidelity to the teacher (embeddings) distil the encoder blocks' hidden states besides the
    output's cosine (``kd.features: hidden``; the applicability check leaves ``none`` to a model
    without encoder blocks); the log line."""
    if "space" in cfg.model_fields_set:
        return None
    said = []
    if task is not None and task.metric_obj.kind == "fidelity" and space.model.kd.features.fixed == "none":
        kd = space.model.kd.model_copy(update={"features": type(space.model.kd.features)(fixed="hidden")})
        space.model = space.model.model_copy(update={"kd": kd})
        said.append("fine-tunes distil the encoder blocks' hidden states (kd.features: hidden)")
    groups = auto_groups(inventory) if space.model.groups == "layer" else None
    if groups is not None:
        space.model = space.model.model_copy(update={"groups": groups})
        said.insert(
            0,
            f"{len(inventory)} layers share parameters by role in {len(groups)} groups "
            f"(e.g. {next(iter(groups))})",
        )
    return f"space: not set in the study; {'; '.join(said)}" if said else None
