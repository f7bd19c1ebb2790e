"""Each piece of Optuna's private API the project uses, called against the installed Optuna.

These tests fail (never skip) when an Optuna release moves or changes one of them: fix
``autocompress/optuna_compat.py`` then, and nothing else.
"""

from __future__ import annotations

import time

import optuna
import pytest
from optuna.storages import RDBStorage
from optuna.trial import TrialState

from autocompress import optuna_compat as oc
from autocompress.search.storage import make_storage


def _study(tmp_path, **storage_kw) -> optuna.Study:
    storage = make_storage(f"sqlite:///{tmp_path / 'compat.db'}", **storage_kw)
    return optuna.create_study(study_name="compat", storage=storage, directions=["minimize", "minimize"])


def test_trial_id_and_storage_of(tmp_path):
    study = _study(tmp_path)
    trial = study.ask()
    storage = oc.storage_of(study)
    assert isinstance(storage, optuna.storages.BaseStorage)
    tid = oc.trial_id(trial)
    assert isinstance(tid, int)
    storage.set_trial_user_attr(tid, "k", 1)
    study.tell(trial, [1.0, 2.0])
    frozen = study.trials[0]
    assert oc.trial_id(frozen) == tid
    assert storage.get_trial(tid).user_attrs == {"k": 1}


def test_hypervolume_of_boxes():
    # by hand: one box of 0.5 x 0.5; two boxes of 0.5 x 1 overlapping in 0.5 x 0.5
    assert oc.hypervolume([[0.5, 0.5]], [1.0, 1.0]) == pytest.approx(0.25)
    assert oc.hypervolume([[0.0, 0.5], [0.5, 0.0]], [1.0, 1.0]) == pytest.approx(0.75)
    assert oc.hypervolume([[0.2, 0.2, 0.2]], [1.0, 1.0, 1.0]) == pytest.approx(0.8**3)


def test_heartbeat_and_fail_stale_trials(tmp_path):
    study = _study(tmp_path, heartbeat_interval_s=1, grace_period_s=1)
    trial = study.ask()
    with oc.heartbeat(trial, study):
        pass  # the heartbeat thread starts and stops; the trial has a heartbeat now
    time.sleep(2.2)  # older than the grace period: stale
    oc.fail_stale_trials(study)
    states = [t.state for t in study.get_trials(deepcopy=False)]
    assert states[0] == TrialState.FAIL


def test_heartbeat_protocol_names():
    assert oc.STALE_TRIAL_IDS in oc.BaseHeartbeat.__abstractmethods__
    assert "record_heartbeat" in oc.BaseHeartbeat.__abstractmethods__
    for name in oc.CACHED_STORAGE_CALLS:
        assert callable(getattr(RDBStorage, name)), name
