"""Long runs stay flat: nothing a trial builds outlives it, and the bookkeeping stays cheap."""

from __future__ import annotations

import gc
import sqlite3

import onnxruntime as ort
import pytest
import torch
import yaml
from conftest import ROOT

from autocompress.config import load_config
from autocompress.search import runner

pytestmark = pytest.mark.slow


def _trial_objects() -> tuple[int, int]:
    """Live modules and ORT sessions the collector sees (what was alive at set-up is frozen)."""
    gc.collect()
    objs = gc.get_objects()
    return (
        sum(isinstance(o, torch.nn.Module) for o in objs),
        sum(isinstance(o, ort.InferenceSession) for o in objs),
    )


def test_trials_leave_no_model_or_session_behind(tmp_path, monkeypatch):
    study = tmp_path / "s.yaml"
    study.write_text(
        yaml.safe_dump(
            {
                "name": "mem",
                "task": {"name": "digits", "options": {"width": 8, "teacher_epochs": 2}},
                "space": {"file": str(ROOT / "search_spaces/default.yaml")},
                "finetune": {"epochs": 1},
                "sampler": {"name": "random"},
                "trials": {"n": 4, "warm_start": []},
                "output": str(tmp_path / "run"),
            }
        )
    )
    seen: list[tuple[int, int]] = []
    leak: list[torch.nn.Module] = []
    execute = runner.execute_trial

    def counted(ctx, st, trial, fidelity=None):
        out = execute(ctx, st, trial, fidelity)
        if trial.number == 3:  # the check must be able to fail: one trial keeps a model alive
            leak.append(torch.nn.Linear(2, 2))
        seen.append(_trial_objects())
        return out

    monkeypatch.setattr(runner, "execute_trial", counted)
    summary = runner.run_study(load_config(study), log=lambda line: None)
    assert summary.completed == 4
    assert seen[:3] == [(0, 0)] * 3, seen  # each trial's student, teacher copy and session are gone
    assert seen[3] == (1, 0)  # ... and a kept one is seen
    assert gc.get_freeze_count() == 0  # the run unfroze what it froze

    with sqlite3.connect(tmp_path / "run" / "study.db") as db:  # the write-ahead log is on the file
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
