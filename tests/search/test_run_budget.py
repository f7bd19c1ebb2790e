"""``trials.timeout_s`` is the whole run's: set-up (teacher, baseline, applicability) counts, the run
stops inside it with the front found so far exported, and the progress line shows the time left."""

from __future__ import annotations

import json
import time

import pytest
from reliability_helpers import study_file

import autocompress
from autocompress.config import load_config
from autocompress.deadline import (
    check_deadline,
    run_clock,
    run_remaining,
    setup_over,
    trial_scope,
    trials_during_setup,
)
from autocompress.errors import TrialTimeout

BUDGET_S = 12.0  # set-up (teacher, baseline, applicability) takes 2-4 s of it here: trials get the rest
# after the budget: the trial running at its end stops at its next check (an uninterruptible stage such
# as one lowering or one timing session finishes first), then the front is exported and the report
# (plots) written
SLACK_S = 15.0


def test_a_trial_stops_at_the_runs_end_and_names_the_budget():
    with run_clock(0.2):
        assert 0 < run_remaining() <= 0.2 and not setup_over(0.9)
        with trial_scope(0, 60):  # the trial's own limit is later: the run's end comes first
            check_deadline("lowering")
            time.sleep(0.25)
            assert setup_over(0.9)
            with pytest.raises(
                TrialTimeout,
                match=r"the study's wall-time budget \(trials.timeout_s = 0.2 s\) during lowering",
            ):
                check_deadline("lowering")
    with trial_scope(0, 0.01):  # outside a run: the trial's own limit, as before
        time.sleep(0.02)
        with pytest.raises(TrialTimeout, match=r"exceeded trials.trial_timeout_s = 0.01 s during evaluation"):
            check_deadline("evaluation")
    assert run_remaining() is None and not setup_over()


def test_trials_run_during_set_up_are_not_set_up():
    with run_clock(1.0):
        time.sleep(0.3)
        assert setup_over(0.2)
        with trials_during_setup(0.25):  # 0.3 s elapsed, 0.25 s of it trials: 0.05 s of set-up
            assert not setup_over(0.2)
        assert setup_over(0.2)


@pytest.mark.slow
def test_the_budget_covers_set_up_and_the_front_is_exported(tmp_path):
    path, run = study_file(tmp_path, trials={"n": 1000, "timeout_s": BUDGET_S, "warm_start": [{"bits": 8}]})
    lines: list[str] = []
    t0 = time.monotonic()
    summary = autocompress.run_study(load_config(path), log=lines.append)
    wall = time.monotonic() - t0
    assert summary.stopped == "timeout" and 1 <= summary.completed < 1000
    assert wall <= BUDGET_S + SLACK_S, f"{wall:.1f} s for a {BUDGET_S:g} s budget"
    setup = next(line for line in lines if line.startswith("set-up took"))
    assert "of the 0m12s wall-time budget" in setup
    progress = [line for line in lines if line.startswith("[") and "of the budget left" in line]
    assert len(progress) >= summary.completed
    front = json.loads((run / "pareto" / "front.json").read_text())["front"]
    assert front and all(any((run / r["folder"]).iterdir()) for r in front)
    assert any("(set-up included) reached after" in line for line in lines)
