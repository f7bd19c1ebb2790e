"""Every private piece of Optuna this project relies on, in one place.

Optuna does not export a trial's storage id, a study's storage, the heartbeat thread or its
hypervolume routine. The project needs them (a trial's intermediate values written by id, heartbeats
of shared-storage workers, the hypervolume of a front). Everything else imports them from here, and
``tests/test_optuna_compat.py`` calls each of them against the installed Optuna, so an Optuna release
that moves one fails that test, not a long run.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence

import numpy as np
import optuna
from optuna._hypervolume import compute_hypervolume
from optuna.storages import BaseStorage
from optuna.storages._heartbeat import BaseHeartbeat, get_heartbeat_thread

__all__ = [
    "CACHED_STORAGE_CALLS",
    "BaseHeartbeat",
    "STALE_TRIAL_IDS",
    "fail_stale_trials",
    "first_heartbeat",
    "heartbeat",
    "hypervolume",
    "storage_of",
    "trial_id",
]

# the method of :class:`BaseHeartbeat` that a storage implements to name its stale trials (private in Optuna)
STALE_TRIAL_IDS = "_get_stale_trial_ids"

# the private RDBStorage methods that Optuna's ``_CachedStorage`` (which wraps every RDB storage a study
# opens) calls directly, besides the public ones; a storage that retries calls must retry these too
CACHED_STORAGE_CALLS = (
    STALE_TRIAL_IDS,
    "_create_new_trial",
    "_get_best_trial_id",
    "_get_trials",
    "_set_trial_param",
)


def trial_id(trial: optuna.Trial | optuna.trial.FrozenTrial) -> int:
    """The storage's id of ``trial`` (live or frozen); storages address trials by it, not by number."""
    return trial._trial_id


def storage_of(study: optuna.Study) -> BaseStorage:
    """The storage object a study reads and writes (the one it was created or loaded with)."""
    return study._storage


def hypervolume(points: Sequence[Sequence[float]] | np.ndarray, reference: Sequence[float]) -> float:
    """Hypervolume dominated by ``points`` (to be minimized) inside the box up to ``reference``."""
    return float(compute_hypervolume(np.asarray(points, dtype=float), np.asarray(reference, dtype=float)))


@contextlib.contextmanager
def heartbeat(trial: optuna.Trial, study: optuna.Study) -> Iterator[None]:
    """Record ``trial``'s heartbeat in the study's storage while the block runs (no-op without one)."""
    with get_heartbeat_thread(trial_id(trial), storage_of(study)):
        yield


def first_heartbeat(trial: optuna.Trial, study: optuna.Study) -> None:
    """Record ``trial``'s first heartbeat now (no-op without heartbeats). Call right after ``ask``:
    a RUNNING trial with no heartbeat at all is never stale to Optuna, so a worker killed before its
    heartbeat thread's first beat would leave the trial RUNNING for ever and the others waiting."""
    storage = storage_of(study)
    if isinstance(storage, BaseHeartbeat) and storage.get_heartbeat_interval() is not None:
        storage.record_heartbeat(trial_id(trial))


def fail_stale_trials(study: optuna.Study) -> None:
    """Fail the RUNNING trials whose heartbeat is older than the grace period (and run the retry
    callback of the storage, which queues a copy of each). Optuna's call is experimental: its warning
    is silenced here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
