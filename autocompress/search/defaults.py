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
    """Set ``cfg.finetune`` epochs (or steps) from the data when the study leaves both out; the log line.

    Raises:
        ConfigError: the study counts epochs (``finetune.epochs`` > 0, no ``steps``) of a training split
            without a length.
    """
    ft = cfg.finetune
    if {"epochs", "steps"} & ft.model_fields_set:
        if ft.steps is None and ft.epochs > 0 and steps_per_epoch(task, ft.batch_size) is None:
            raise ConfigError(
                f"{ft.epochs} epochs cannot be counted: the task's training split has no length; "
                "set finetune.steps instead",
                source=cfg.source,
                field="finetune.epochs",
            )
        return None
    epochs, steps = auto_epochs(task, ft.batch_size)
    if epochs is None:
        cfg.finetune = ft.model_copy(update={"steps": steps})
        return f"finetune: not set in the study; {steps} steps per trial (the training split has no length)"
    cfg.finetune = ft.model_copy(update={"epochs": epochs})
    per_epoch = steps_per_epoch(task, ft.batch_size)
    return (
        f"finetune: not set in the study; {epochs} epochs per trial ({per_epoch} steps of batch "
        f"{ft.batch_size} each, ~{TARGET_STEPS} steps)"
    )


def role_of(layer: str) -> str:
    """A layer's name with its block indices as ``*`` (``blocks.3.conv`` -> ``blocks.*.conv``)."""
    return re.sub(r"(?<=\.)\d+(?=\.)|^\d+(?=\.)", "*", layer)


def auto_groups(inventory) -> dict[str, str] | None:
    """``{group: regex}`` sharing parameters among layers of the same role, for deep models (else None)."""
    if len(inventory) <= GROUP_ABOVE:
        return None
    groups: dict[str, str] = {}
    for info in inventory:
        role = role_of(info.name)
        groups.setdefault(role, "\\.".join(p if p == "*" else re.escape(p) for p in role.split(".")))
    return {g: r.replace("*", r"\d+") for g, r in groups.items()}


def apply_space_default(cfg: StudyConfig, space, inventory) -> str | None:
    """Group a deep model's layers by role when the study names no space; the log line."""
    if "space" in cfg.model_fields_set or space.model.groups != "layer":
        return None
    groups = auto_groups(inventory)
    if groups is None:
        return None
    space.model = space.model.model_copy(update={"groups": groups})
    return (
        f"space: not set in the study; {len(inventory)} layers share parameters by role in "
        f"{len(groups)} groups (e.g. {next(iter(groups))})"
    )
