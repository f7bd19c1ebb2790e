"""Optuna storages by URL: any RDB URL, or ``journal:///path/journal.log`` (Optuna's journal file).

Workers that share one storage (``autocompress worker``) turn on Optuna's heartbeat: each running trial
records a heartbeat every ``heartbeat_interval_s``; a trial whose heartbeat is older than the grace period
belongs to a dead worker, and :func:`optuna.storages.fail_stale_trials` marks it failed and runs
:class:`optuna.storages.RetryHeartbeatStaleTrialCallback`, which queues a copy of it (same parameters) for
the next ``ask``. RDB storages implement the heartbeat themselves; Optuna's ``JournalStorage`` does not, so
:class:`HeartbeatJournalStorage` adds the same heartbeat protocol (Optuna's private ``BaseHeartbeat``,
through :mod:`autocompress.optuna_compat`)
on top of it (heartbeat time kept as a trial system attribute), and Optuna's own ``fail_stale_trials`` and
retry callback do the rest.

A database server (PostgreSQL, MySQL) may go away for a while: restarted, fail-over, a network cut.
:class:`ReconnectingRDBStorage` retries every storage call whose connection was lost for up to
``workers.storage_retry_s`` seconds of the study file (default 120; the environment variable
``AUTOCOMPRESS_STORAGE_RETRY_S`` overrides it), reconnecting through a fresh pooled connection;
past that it raises :class:`StorageUnavailable`, one line that says so. A call retried after a lost
connection is safe: the transaction that was cut was rolled back by the server. After an outage, a
worker does not judge other workers' heartbeats stale until a grace period has passed again, so a
live worker whose heartbeats could not reach the database meanwhile does not lose its trial.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import time
import warnings
import weakref
from collections.abc import Callable
from pathlib import Path

import optuna
from optuna.storages import BaseStorage, JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import event
from sqlalchemy import exc as sa_exc

from ..errors import ConfigError, StorageUnavailable
from ..optuna_compat import CACHED_STORAGE_CALLS, BaseHeartbeat, trial_id
from ..redact import mask_url

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
                stale.append(trial_id(t))
        return stale

    def get_heartbeat_interval(self) -> int | None:
        return self._interval

    def get_heartbeat_stale_trial_callback(self) -> Callable[[optuna.Study, FrozenTrial], None] | None:
        return self._callback


RETRY_ENV = "AUTOCOMPRESS_STORAGE_RETRY_S"
DEFAULT_RETRY_S = 120.0


def _connection_lost(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it: Optuna wraps SQLAlchemy's errors) is a lost or refused connection."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, sa_exc.DBAPIError) and (
            e.connection_invalidated or isinstance(e, sa_exc.OperationalError | sa_exc.InterfaceError)
        ):
            return True
        e = e.__cause__ or e.__context__
    return False


_RETRIED = (
    "create_new_study",
    "delete_study",
    "set_study_user_attr",
    "set_study_system_attr",
    "get_study_id_from_name",
    "get_study_name_from_id",
    "get_study_directions",
    "get_study_user_attrs",
    "get_study_system_attrs",
    "get_all_studies",
    "create_new_trial",
    "set_trial_param",
    "get_trial_id_from_study_id_trial_number",
    "set_trial_state_values",
    "set_trial_intermediate_value",
    "set_trial_user_attr",
    "set_trial_system_attr",
    "get_trial",
    "get_all_trials",
    "get_n_trials",
    "get_best_trial",
    "get_trial_params",
    "get_trial_user_attrs",
    "get_trial_system_attrs",
    "get_trial_param",
    "get_trial_number_from_id",
    "check_trial_is_updatable",
    "record_heartbeat",
    *CACHED_STORAGE_CALLS,
)


class ReconnectingRDBStorage(RDBStorage):
    """Optuna's RDB storage whose calls survive the database going away for up to ``retry_s`` seconds.

    Raises:
        StorageUnavailable: from any call, once the database has been unreachable for ``retry_s``.
    """

    def __init__(self, url: str, *, retry_s: float = DEFAULT_RETRY_S, **kwargs):
        self._retry_s = retry_s
        self._local = threading.local()
        self._outage_end: float | None = None  # monotonic time the database answered again
        self._shown = make_url_safe(url)
        engine_kwargs = {"pool_pre_ping": True, **kwargs.pop("engine_kwargs", {})}
        backend = url.split(":", 1)[0].split("+", 1)[0]
        if backend == "postgresql":  # libpq: give up a connection attempt, or a dead peer, within seconds
            engine_kwargs.setdefault(
                "connect_args",
                {"connect_timeout": 10, "keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10},
            )
        elif backend in ("mysql", "mariadb"):
            engine_kwargs.setdefault("connect_args", {"connect_timeout": 10})
        self._retrying(lambda: RDBStorage.__init__(self, url, engine_kwargs=engine_kwargs, **kwargs))

    def _retrying(self, call: Callable):
        if getattr(self._local, "depth", 0):  # an outer call retries the whole thing
            return call()
        self._local.depth = 1
        try:
            t0, wait, warned = time.monotonic(), 0.5, False
            while True:
                try:
                    out = call()
                except Exception as exc:
                    if not _connection_lost(exc):
                        raise
                    down = time.monotonic() - t0
                    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                    cause = exc.__cause__ or exc.__context__
                    if cause is not None and str(cause).strip():
                        first = str(cause).strip().splitlines()[0]
                    if down >= self._retry_s:
                        raise StorageUnavailable(
                            f"the storage {self._shown} has been unreachable for {down:.0f} s ({first}); "
                            "finished trials are safe in it: run the same command again once it is back"
                        ) from None
                    if not warned:
                        print(
                            f"warning: storage {self._shown} unreachable ({first}); "
                            f"retrying for up to {self._retry_s:.0f} s",
                            flush=True,
                        )
                        warned = True
                    time.sleep(min(wait, max(0.0, self._retry_s - down)))
                    wait = min(wait * 2, 5.0)
                    continue
                if warned:
                    self._outage_end = time.monotonic()
                    print(
                        f"storage {self._shown} reachable again after {time.monotonic() - t0:.0f} s",
                        flush=True,
                    )
                return out
        finally:
            self._local.depth = 0

    def record_heartbeat(self, trial_id: int) -> None:
        # runs in Optuna's heartbeat thread: an outage longer than the retry window must not kill that thread
        # (the next beat tries again; the main thread reports the outage)
        with contextlib.suppress(StorageUnavailable):
            self._retrying(lambda: RDBStorage.record_heartbeat(self, trial_id))

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        grace = self.grace_period or 2 * (self.heartbeat_interval or 0)
        if self._outage_end is not None and time.monotonic() - self._outage_end < grace:
            return []  # heartbeats of live workers could not reach the database: give them a grace period
        return self._retrying(lambda: RDBStorage._get_stale_trial_ids(self, study_id))

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.pop("_local", None)
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._local = threading.local()


def _wrap(name: str) -> Callable:
    base = getattr(RDBStorage, name)

    @functools.wraps(base)
    def method(self, *args, **kwargs):
        return self._retrying(lambda: base(self, *args, **kwargs))

    return method


for _name in _RETRIED:
    if _name not in ReconnectingRDBStorage.__dict__:
        setattr(ReconnectingRDBStorage, _name, _wrap(_name))


def make_url_safe(url: str) -> str:
    """``url`` with its password hidden (for messages): :func:`autocompress.redact.mask_url`."""
    return mask_url(url)


def retry_window_s(configured: float | None = None) -> float:
    """The retry window: ``AUTOCOMPRESS_STORAGE_RETRY_S`` when set, else ``configured`` (the study's
    ``workers.storage_retry_s``), else the default (120 s).

    Raises:
        ConfigError: the environment variable is not a number of seconds >= 0.
    """
    raw = os.environ.get(RETRY_ENV)
    if raw is None:
        return DEFAULT_RETRY_S if configured is None else float(configured)
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{RETRY_ENV}={raw!r}: not a number of seconds") from None
    if not value >= 0:
        raise ConfigError(f"{RETRY_ENV}={raw!r}: must be a number of seconds >= 0")
    return value


def _rdb(url: str, retry_s: float | None = None, **kwargs) -> RDBStorage:
    """Optuna's RDB storage; a database server's one reconnects (see :class:`ReconnectingRDBStorage`)."""
    if url.startswith("sqlite"):
        return RDBStorage(url, **kwargs)
    return ReconnectingRDBStorage(url, retry_s=retry_window_s(retry_s), **kwargs)


def make_storage(
    url: str,
    *,
    heartbeat_interval_s: int | None = None,
    grace_period_s: int | None = None,
    max_retry: int | None = None,
    retry_s: float | None = None,
) -> BaseStorage:
    """The Optuna storage of ``url``; with ``heartbeat_interval_s``, stale trials are failed and retried.

    ``retry_s``: how long a database server's storage retries a lost connection (the study's
    ``workers.storage_retry_s``; see :func:`retry_window_s`).

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
        if not path.parent.is_dir():  # a typo must not create folders (run_setup's checks say so first)
            raise ConfigError(f"cannot open {url!r}: folder {str(path.parent)!r} does not exist")
        if heartbeat_interval_s:
            return HeartbeatJournalStorage(path, heartbeat_interval_s, grace, callback)
        return JournalStorage(JournalFileBackend(str(path)))
    if not heartbeat_interval_s:
        return optuna.storages.get_storage(_sqlite_wal(_rdb(url, retry_s)))  # Optuna's cached wrapper
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return _sqlite_wal(
            _rdb(
                url,
                retry_s,
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
    _SQLITE.add(storage)
    return storage


_SQLITE: weakref.WeakSet = weakref.WeakSet()  # the SQLite file storages this process opened


def close_sqlite_storages() -> None:
    """Close the pooled connections of every SQLite file storage this process opened. The last
    connection to close checkpoints the write-ahead log into the database file and deletes
    ``study.db-wal`` / ``study.db-shm``; a process that ends without collecting its heap
    (:func:`autocompress.cli.run`) would leave them beside the database otherwise."""
    for storage in list(_SQLITE):
        storage.engine.dispose()


def check_storage_url(url: str) -> None:
    """Raise ConfigError (without a source) unless ``url`` is a database URL or a journal file URL."""
    if journal_path(url) is not None:
        return
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        make_url(url)
    except (ArgumentError, ValueError):  # ValueError: e.g. a port that is not a number
        raise ConfigError(
            f"{mask_url(url)!r} is not a database URL (e.g. sqlite:///runs/x/study.db, postgresql://host/db) "
            "nor a journal file (journal:///shared/x.log)"
        ) from None


def study_names(url: str) -> list[str]:
    """The studies a storage holds (without the per-trial fidelity studies of early stopping)."""
    names = optuna.get_all_study_names(make_storage(url))
    return [n for n in names if not n.endswith(FIDELITY_SUFFIX)]


FIDELITY_SUFFIX = ".fidelity"
