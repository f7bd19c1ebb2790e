"""The retry window of a database server's storage: ``workers.storage_retry_s`` in the study file, the
``AUTOCOMPRESS_STORAGE_RETRY_S`` environment variable over it (the outage itself: tests/test_postgres.py)."""

from __future__ import annotations

import socket
import time

import pytest

from autocompress.config import WorkersConfig
from autocompress.errors import ConfigError, StorageUnavailable
from autocompress.search.storage import DEFAULT_RETRY_S, RETRY_ENV, make_storage, retry_window_s


def test_window_from_the_study_file_env_overrides_it(monkeypatch):
    monkeypatch.delenv(RETRY_ENV, raising=False)
    assert WorkersConfig().storage_retry_s == DEFAULT_RETRY_S == 120
    assert retry_window_s() == DEFAULT_RETRY_S
    assert retry_window_s(7) == 7.0
    monkeypatch.setenv(RETRY_ENV, "3.5")
    assert retry_window_s(7) == 3.5
    for bad in ("soon", "-1", "nan"):
        monkeypatch.setenv(RETRY_ENV, bad)
        with pytest.raises(ConfigError, match=RETRY_ENV):
            retry_window_s(7)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once closed


def test_unreachable_server_is_retried_for_the_configured_window(monkeypatch):
    pytest.importorskip("psycopg2")
    monkeypatch.delenv(RETRY_ENV, raising=False)
    url = f"postgresql+psycopg2://nobody@127.0.0.1:{_closed_port()}/none"
    t0 = time.monotonic()
    with pytest.raises(StorageUnavailable, match=r"has been unreachable for [1-3] s"):
        make_storage(url, retry_s=1.5)
    assert 1.5 <= time.monotonic() - t0 < 10
    monkeypatch.setenv(RETRY_ENV, "0")  # the environment variable wins over the study's value
    t0 = time.monotonic()
    with pytest.raises(StorageUnavailable, match=r"has been unreachable for 0 s"):
        make_storage(url, retry_s=120)
    assert time.monotonic() - t0 < 5
