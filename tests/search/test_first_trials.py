"""A hands-off study's first trials (the peers' one-call int8 answers) run right after the baseline,
before the applicability check and the profile, which then narrow the space and plan the rest."""

from __future__ import annotations

import json
import subprocess
import sys

import optuna
import pytest
from conftest import cli_env
from optuna.trial import TrialState
from reliability_helpers import study_file

import autocompress
from autocompress.config import load_config
from autocompress.search.first_trials import (
    DONE,
    EARLY_PROFILE,
    FIXED_PLAN,
    SECOND_STAGE,
    SETUP_STAGE,
    mixed_scale,
    setup_pending,
)
from autocompress.search.one_shot import POST_TRAINING, STATIC
from autocompress.search.repeats import REPEAT_OF

pytestmark = pytest.mark.slow

TPE = {"name": "tpe", "options": {"n_startup_trials": 1}}  # TPE's own path from the second trial on


def _hands_off(tmp_path, n: int, **changes):
    return study_file(
        tmp_path,
        trials={"n": n, "planned_starts": 3},
        budgets={"max_metric_drop": 0.5},
        sampler=TPE,
        **changes,
    )


def test_the_one_shot_trials_complete_before_the_applicability_check_and_the_profile(tmp_path):
    path, _ = _hands_off(tmp_path, 3)
    lines: list[str] = []
    summary = autocompress.run_study(load_config(path), log=lines.append)
    study = summary.study
    assert summary.completed == 3 and study.user_attrs[SETUP_STAGE] == DONE
    first = study.trials[0]  # the digits CNN: int8 static everywhere (no dynamic answer for a CNN)
    assert first.state == TrialState.COMPLETE and first.user_attrs["planned"]["name"] == STATIC
    assert first.user_attrs[POST_TRAINING] and first.user_attrs["plan"]["steps"] == 0
    assert first.params == {} and first.user_attrs["plan"] == first.user_attrs[FIXED_PLAN]
    assert {layer["bits"] for layer in first.user_attrs["plan"]["layers"].values()} == {8}
    # ... completed before the second stage (applicability, profile) began
    assert first.datetime_complete.timestamp() < study.user_attrs[SECOND_STAGE]["start"]

    def at(prefix: str) -> int:
        return next(i for i, s in enumerate(lines) if s.startswith(prefix))

    assert at("planned start 'int8 static everywhere' (post-training), a first trial") < at("[1/3] trial 0")
    assert at("[1/3] trial 0") < at("applicability:") < at("latency profile:") < at("[2/3] trial 1")
    # the profile took the first trial's whole-model row, and planned no structure it measured again
    assert study.user_attrs["latency_profile"]["from_trials"] == 1
    # ... with the layers it quantizes: the plans built on that base (the uniform channel removals) are int8
    rows = json.loads((load_config(path).output_dir() / "latency_profile.json").read_text())["rows"]
    (row,) = [r for r in rows if r["layer"] == "*" and r.get("timed") == "trial 0"]
    int8 = {k: v["bits"] for k, v in first.user_attrs[FIXED_PLAN]["layers"].items() if v["bits"] < 32}
    assert int8 and {k: v["bits"] for k, v in row["values"].items()} == int8
    later = study.trials[1:]
    assert all(t.state == TrialState.COMPLETE and REPEAT_OF not in t.user_attrs for t in later)
    assert all(t.user_attrs.get("planned", {}).get("name") != STATIC for t in later)
    # the applicability check narrowed a categorical domain after the first trial: the later trials were
    # asked in it (Optuna refuses another choice set for a parameter a trial of the study holds)
    narrowed = study.user_attrs["narrowed_domains"]
    assert narrowed["sparsity_kind.features.0"] == {"fixed": "unstructured"}
    assert all("sparsity_kind.features.0" not in t.params for t in later)


def test_a_narrowing_that_excludes_a_first_trials_value_keeps_the_sampler_working(tmp_path):
    """The first trials hold no Optuna parameter, so a domain narrowed after them may leave out their
    values (here 8 bits on features.0, which trial 0 ran): TPE and the planned starts go on in it."""
    path, _ = _hands_off(tmp_path, 5)
    stopped = autocompress.run_study(load_config(path), log=lambda s: None, stop_after=1)
    study = stopped.study
    assert stopped.completed == 1 and setup_pending(study)  # killed here: the second stage still due
    assert study.trials[0].user_attrs["plan"]["layers"]["features.0"]["bits"] == 8
    study.set_user_attr("narrowed_domains", {"bits.features.0": {"choices": [4, 32]}})
    lines: list[str] = []
    summary = autocompress.run_study(load_config(path), log=lines.append)
    study = summary.study
    assert summary.completed == 5 and not study.get_trials(states=(TrialState.FAIL,))
    assert study.user_attrs["narrowed_domains"]["bits.features.0"] == {"choices": [4, 32]}
    assert sum(s.startswith("latency profile:") for s in lines) == 1  # the second stage ran once
    planned = [t for t in study.trials if "planned" in t.user_attrs]
    # int8 everywhere in the narrowed space (features.0 float) is another structure: planned again
    again = [t for t in planned[1:] if t.user_attrs["planned"]["name"] == STATIC]
    assert planned[0].number == 0 and len(again) == 1
    assert all(t.user_attrs["plan"]["layers"]["features.0"]["bits"] == 32 for t in again)
    for t in study.trials[1:]:
        assert t.user_attrs["plan"]["layers"]["features.0"]["bits"] in (4, 32), t.number
        assert t.params.get("bits.features.0", 32) in (4, 32)


def test_two_workers_run_the_second_stage_once(tmp_path):
    path, run = _hands_off(tmp_path, 3, storage=f"sqlite:///{tmp_path / 'shared.db'}")
    logs = [tmp_path / f"worker{i}.log" for i in range(2)]
    procs = []
    for log in logs:
        with log.open("w") as f:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "autocompress.cli", "worker", str(path)],
                    env=cli_env(),
                    stdout=f,
                    stderr=subprocess.STDOUT,
                )
            )
    try:
        rcs = [p.wait(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    out = [log.read_text() for log in logs]
    assert rcs == [0, 0], [o[-2000:] for o in out]
    assert sum(o.count("latency profile:") for o in out) == 1
    assert sum(o.count("applicability: ") for o in out) == 1
    assert sum(o.count("a first trial before the applicability check") for o in out) == 1
    study = optuna.load_study(study_name="rel", storage=f"sqlite:///{tmp_path / 'shared.db'}")
    done = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(done) >= 3 and FIXED_PLAN in study.trials[0].user_attrs
    # every worker asked in the narrowed domains (the one that did not run the stage read them back)
    assert all("sparsity_kind.features.0" not in t.params for t in study.trials[1:])


def test_the_first_trials_time_is_not_counted_as_set_up():
    """The profile stops at the run's set-up share of trials.timeout_s: the first trials' wall time,
    which precedes it, is trials' time (finished ones, whatever their state; other trials not)."""
    import datetime

    from autocompress.search.first_trials import first_trials_seconds

    study = optuna.create_study()
    t0 = datetime.datetime(2026, 1, 1)
    for seconds, attrs, state in (
        (100, {FIXED_PLAN: {}}, TrialState.COMPLETE),
        (30, {FIXED_PLAN: {}}, TrialState.FAIL),
        (500, {}, TrialState.COMPLETE),  # a trial of the search
    ):
        study.add_trial(
            optuna.trial.FrozenTrial(
                number=0, trial_id=0, state=state, value=1.0 if state == TrialState.COMPLETE else None,
                values=None, datetime_start=t0, datetime_complete=t0 + datetime.timedelta(seconds=seconds),
                params={}, distributions={}, user_attrs=attrs, system_attrs={}, intermediate_values={},
            )
        )  # fmt: skip
    assert first_trials_seconds(study) == 130.0


def test_the_mixed_int8_plan_runs_before_the_rest_of_the_profile(tmp_path):
    """Where int8 everywhere costs accuracy, the profile first measures each unit's 8-bit row alone; the
    mixed plan (the most sensitive units float) runs next, as a first trial, and only then the rest of
    the profile plans the rest."""
    path, _ = study_file(
        tmp_path,
        task={"name": "tiny_tasks:int8_sensitive_mlp"},
        trials={"n": 4, "planned_starts": 4},
        budgets={"max_metric_drop": 0.01},
        sampler=TPE,
    )
    lines: list[str] = []
    study = autocompress.run_study(load_config(path), log=lines.append).study

    def at(prefix: str) -> int:
        return next(i for i, s in enumerate(lines) if s.startswith(prefix))

    # trials 0 and 1: int8 static and dynamic everywhere; then the profile's 8-bit rows alone, and the
    # mixed plan (the classifier float) as trial 2, before the rest of the profile
    mixed = "planned start 'int8 static, 1 sensitive layer float' (post-training), a first trial from the"
    assert at("[2/4] trial 1") < at("latency profile:") < at(mixed) < at("[3/4] trial 2")
    assert (
        at("[3/4] trial 2") < at("the first trials are done: the rest of the profile") < at("[4/4] trial 3")
    )
    third = study.trials[2].user_attrs
    assert third["planned"]["name"] == "int8 static, 1 sensitive layer float" and third[POST_TRAINING]
    assert {k: v["bits"] for k, v in third[FIXED_PLAN]["layers"].items()} == {"0": 8, "2": 32}
    # it missed the budget by more than predicted: the rest of the plan scales the predictions by it
    measured, predicted = third["metric_drop"], third["planned"]["metric_drop"]
    assert measured > 0.01 and measured > predicted > 0
    assert mixed_scale(study, 0.01) == pytest.approx(measured / predicted)
    assert mixed_scale(study, 1.0) == 1.0  # within a looser budget: as predicted
    assert sum(s.startswith("latency profile:") for s in lines) == 2
    # the full pass took the first pass's rows from the file and counts its cost
    early, full = study.user_attrs[EARLY_PROFILE], study.user_attrs["latency_profile"]
    assert early["lowerings"] >= 1 and full["lowerings"] >= early["lowerings"]
    assert full["seconds"] >= early["seconds"] and study.user_attrs[SETUP_STAGE] == DONE
    assert "int8 static, 1 sensitive layer float" not in [
        t.user_attrs.get("planned", {}).get("name") for t in study.trials[3:]
    ]
