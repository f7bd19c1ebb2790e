"""Long runs stay flat: nothing a trial builds outlives it, and the bookkeeping stays cheap."""

from __future__ import annotations

import gc
import sqlite3

import pytest
import torch
from reliability_helpers import study_file

from autocompress.config import load_config
from autocompress.search import runner
from autocompress.testing import live_objects

pytestmark = pytest.mark.slow


def test_trials_leave_no_model_or_session_behind(tmp_path, monkeypatch):
    study, run = study_file(tmp_path, "mem", trials__warm_start=[])
    seen: list[tuple[int, int]] = []
    leak: list[torch.nn.Module] = []
    execute = runner.execute_trial

    def counted(ctx, st, trial, fidelity=None):
        out = execute(ctx, st, trial, fidelity)
        if trial.number == 3:  # the check must be able to fail: one trial keeps a model alive
            leak.append(torch.nn.Linear(2, 2))
        seen.append(live_objects())
        return out

    monkeypatch.setattr(runner, "execute_trial", counted)
    summary = runner.run_study(load_config(study), log=lambda line: None)
    assert summary.completed == 4
    assert seen[:3] == [(0, 0)] * 3, seen  # each trial's student, teacher copy and session are gone
    assert seen[3] == (1, 0)  # ... and a kept one is seen
    assert gc.get_freeze_count() == 0  # the run unfroze what it froze

    with sqlite3.connect(run / "study.db") as db:  # the write-ahead log is on the file
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
