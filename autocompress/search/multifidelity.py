"""Early stopping (multi-fidelity): stop hopeless trials during fine-tuning with Optuna's pruners
(locally and in workers; the study file's ``early_stopping:``).

Optuna pruners are single-objective and ``Trial.report`` is refused on a multi-objective study, so each
trial of the main (accuracy x latency x size) study gets a twin trial in a single-objective study of the
same storage (``<name>.fidelity``, direction maximize, the configured pruner). After every fine-tuning
epoch the torch model's accuracy on a held-out part of the *training* split (never the test split) is
reported to the twin, and the twin's ``should_prune()`` — Optuna's SuccessiveHalving / Hyperband rule over
every trial's reported accuracies — decides. The same values are stored as the main trial's intermediate
values and user attrs (``val_accuracy``, ``epochs_done``), so a pruned trial keeps its last metrics.
Under Ray, Tune's ASHA / HyperBand schedulers apply the same rule to the same reported accuracy.
"""

from __future__ import annotations

from collections.abc import Callable

import optuna
import torch
from optuna.trial import TrialState
from torch import nn

from ..config import EarlyStoppingConfig, StudyConfig
from ..errors import ConfigError
from ..holdout import HeldOut, holdout_scores, split_training
from ..optuna_compat import trial_id
from ..tasks import Split, Task
from .storage import FIDELITY_SUFFIX

PRUNERS = {
    "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
    "hyperband": optuna.pruners.HyperbandPruner,
}


def make_pruner(cfg: EarlyStoppingConfig) -> optuna.pruners.BasePruner | None:
    """Optuna's pruner named by the study file (None for ``none``)."""
    if cfg.name == "none":
        return None
    try:
        return PRUNERS[cfg.name](**cfg.options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"bad option for {cfg.name!r}: {exc}", field="early_stopping.options") from None


def split_holdout(task: Task, fraction: float, seed: int) -> tuple[Task, tuple[torch.Tensor, torch.Tensor]]:
    """(task fine-tuned on the rest of the training split, held-out (inputs, labels) of that split): the
    tensors form of :func:`autocompress.holdout.split_training`."""
    if task.train_split.tensors is None or task.metric_obj.needs_reference:
        raise ConfigError(
            "early stopping holds out part of a training split given as (inputs, labels) tensors, scored "
            "by a metric that needs no teacher outputs; use early_stopping.name: none for this task",
            field="early_stopping.name",
        )
    held = split_training(task, fraction, seed)
    return held.task, held.split.tensors


def holdout_accuracy(model: nn.Module, task: Task, data: tuple[torch.Tensor, torch.Tensor] | Split) -> float:
    """The task's metric of the torch model (in eval mode) on held-out data; the model's mode is kept."""
    split = data if isinstance(data, Split) else task._split("holdout", data)
    return holdout_scores([model], task, split)[0]


class Fidelity:
    """The held-out split and the twin single-objective study that runs the configured Optuna pruner."""

    def __init__(self, cfg: StudyConfig, storage: optuna.storages.BaseStorage, held: HeldOut):
        pruner = make_pruner(cfg.early_stopping)
        if held.split is None:
            raise ConfigError(
                f"early stopping needs a held-out part: {held.reason}", field="early_stopping.name"
            )
        self.task, self.holdout = held.task, held.split
        self.twin = optuna.create_study(
            study_name=cfg.name + FIDELITY_SUFFIX,
            storage=storage,
            direction="maximize",
            pruner=pruner,
            sampler=optuna.samplers.RandomSampler(seed=cfg.seed),  # never samples: no parameters
            load_if_exists=True,
        )
        self._storage = storage
        self._twins: dict[int, optuna.Trial] = {}

    def on_epoch(self, trial: optuna.Trial) -> Callable[[int, float, nn.Module], None]:
        """The ``on_epoch`` hook of ``trial``: report held-out accuracy, raise TrialPruned if hopeless."""
        twin = self.twin.ask()
        self._twins[trial.number] = twin
        trial.set_user_attr("fidelity_trial", twin.number)

        def hook(epoch: int, loss: float, model: nn.Module) -> None:
            acc = holdout_accuracy(model, self.task, self.holdout)
            trial.set_user_attr("val_accuracy", acc)
            trial.set_user_attr("epochs_done", epoch + 1)
            self._storage.set_trial_intermediate_value(trial_id(trial), epoch, acc)
            twin.report(acc, epoch)
            if twin.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {epoch + 1}: held-out accuracy {acc:.4f}")

        return hook

    def finish(self, trial: optuna.Trial, state: TrialState) -> None:
        """Close the twin of ``trial`` with the same outcome (its last accuracy if it completed)."""
        twin = self._twins.pop(trial.number, None)
        if twin is None:
            return
        values = self._storage.get_trial(trial_id(twin)).intermediate_values
        if state == TrialState.COMPLETE and values:
            self.twin.tell(twin, values[max(values)])
        elif state == TrialState.COMPLETE:
            self.twin.tell(twin, state=TrialState.PRUNED)
        else:
            self.twin.tell(twin, state=state)
