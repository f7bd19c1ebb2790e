"""Optuna storages by URL: any RDB URL, or ``journal:///path/journal.log`` (Optuna's journal file).

Workers that share one storage (``autocompress worker``) turn on Optuna's heartbeat: each running trial
records a heartbeat every ``heartbeat_interval_s``; a trial whose heartbeat is older than the grace period
belongs to a dead worker, and :func:`optuna.storages.fail_stale_trials` marks it failed and runs
:class:`optuna.storages.RetryHeartbeatStaleTrialCallback`, which queues a copy of it (same parameters) for
the next ``ask``. RDB storages implement the heartbeat themselves; Optuna's ``JournalStorage`` does not, so
:class:`HeartbeatJournalStorage` adds the same :class:`~optuna.storages._heartbeat.BaseHeartbeat` protocol
on top of it (heartbeat time kept as a trial system attribute), and Optuna's own ``fail_stale_trials`` and
retry callback do the rest.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import optuna
from optuna.storages import BaseStorage, JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import event

from ..errors import ConfigError

JOURNAL_PREFIX = "journal://"
_HEARTBEAT_ATTR = "autocompress:heartbeat"


def journal_path(url: str) -> Path | None:
    """The journal file of a ``journal:///abs/path`` or ``journal://rel/path`` URL, else None."""
    if not url.startswith(JOURNAL_PREFIX):
        return None
    rest = url[len(JOURNAL_PREFIX) :]
    if not rest or rest == "/":
        raise ConfigError(f"{url!r}: journal URL without a file (e.g. journal:///shared/study.log)")
    return Path(rest)


class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """Optuna's journal file storage with Optuna's heartbeat protocol (stale trials -> failed + retried).

    The heartbeat time is the worker's wall clock (``time.time()``): hosts sharing a journal file must
    keep their clocks in sync to well within the grace period (NTP does).
    """

    def __init__(
        self,
        path: Path,
        heartbeat_interval: int,
        grace_period: int,
        callback: Callable[[optuna.Study, FrozenTrial], None] | None,
    ):
        super().__init__(JournalFileBackend(str(path)))
        self._interval, self._grace, self._callback = heartbeat_interval, grace_period, callback

    def record_heartbeat(self, trial_id: int) -> None:
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):  # told between two beats
            self.set_trial_system_attr(trial_id, _HEARTBEAT_ATTR, time.time())

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now = time.time()
        stale = []
        for t in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            beat = t.system_attrs.get(_HEARTBEAT_ATTR)
            if beat is None and t.datetime_start is not None:
                beat = t.datetime_start.timestamp()
            if beat is not None and now - beat > self._grace:
                stale.append(t._trial_id)
        return stale

    def get_heartbeat_interval(self) -> int | None:
        return self._interval

    def get_heartbeat_stale_trial_callback(self) -> Callable[[optuna.Study, FrozenTrial], None] | None:
        return self._callback


def make_storage(
    url: str,
    *,
    heartbeat_interval_s: int | None = None,
    grace_period_s: int | None = None,
    max_retry: int | None = None,
) -> BaseStorage:
    """The Optuna storage of ``url``; with ``heartbeat_interval_s``, stale trials are failed and retried.

    Raises:
        ConfigError: the URL is neither a database URL nor a journal file URL.
    """
    callback = None
    grace = None
    if heartbeat_interval_s:
        grace = grace_period_s or 3 * heartbeat_interval_s
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            callback = RetryHeartbeatStaleTrialCallback(max_retry=max_retry)
    path = journal_path(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if heartbeat_interval_s:
            return HeartbeatJournalStorage(path, heartbeat_interval_s, grace, callback)
        return JournalStorage(JournalFileBackend(str(path)))
    if not heartbeat_interval_s:
        return optuna.storages.get_storage(_sqlite_wal(RDBStorage(url)))  # Optuna's cached wrapper
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return _sqlite_wal(
            RDBStorage(
                url,
                heartbeat_interval=heartbeat_interval_s,
                grace_period=grace,
                heartbeat_stale_trial_callback=callback,
            )
        )


def _sqlite_wal(storage: RDBStorage) -> RDBStorage:
    """A SQLite file storage writes through a write-ahead log with ``synchronous=NORMAL``.

    A trial stores some 50 values (its parameters one by one, then its metrics), each its own
    transaction; with SQLite's default rollback journal every one costs a full sync (1.7 ms here,
    0.6 ms with the log: ``python benchmarks/bookkeeping.py``). A committed trial survives the process being killed either way (what
    resuming relies on); after a power cut the last transactions may be lost, never the file's
    consistency. Readers (``autocompress report``, optuna-dashboard, other workers on the same host)
    no longer wait for writers. Other databases are left as they are.
    """
    engine = storage.engine
    if engine.dialect.name != "sqlite" or engine.url.database in (None, "", ":memory:"):
        return storage

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_connection, _record) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    engine.dispose()  # connections opened while Optuna set the schema up get the pragmas on reopening
    return storage


def check_storage_url(url: str) -> None:
    """Raise ConfigError (without a source) unless ``url`` is a database URL or a journal file URL."""
    if journal_path(url) is not None:
        return
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        make_url(url)
    except ArgumentError:
        raise ConfigError(
            f"{url!r} is not a database URL (e.g. sqlite:///runs/x/study.db, postgresql://host/db) "
            "nor a journal file (journal:///shared/x.log)"
        ) from None


def study_names(url: str) -> list[str]:
    """The studies a storage holds (without the per-trial fidelity studies of the pruner)."""
    names = optuna.get_all_study_names(make_storage(url))
    return [n for n in names if not n.endswith(FIDELITY_SUFFIX)]


FIDELITY_SUFFIX = ".fidelity"
