"""Early stopping (multi-fidelity) with Optuna's pruners on held-out accuracy per epoch (real study, no mocks)."""

from __future__ import annotations

import optuna
import pytest
import torch
import yaml
from conftest import ROOT
from optuna.trial import TrialState

from autocompress.config import load_config
from autocompress.errors import ConfigError
from autocompress.search import run_study
from autocompress.search.multifidelity import split_holdout
from autocompress.search.storage import study_names


def _cfg(tmp_path, **changes):
    data = {
        "name": "fid",
        "task": {"name": "digits", "options": {"width": 8, "teacher_epochs": 3}},
        "space": {"file": str(ROOT / "autocompress/search_spaces/default.yaml")},
        "finetune": {"epochs": 3, "threads": 1},
        "sampler": {"name": "random"},
        "trials": {"n": 8, "warm_start": []},
        "early_stopping": {
            "name": "successive_halving",
            "options": {"min_resource": 1, "reduction_factor": 2, "min_early_stopping_rate": 0},
        },
        "output": str(tmp_path / "run"),
        **changes,
    }
    path = tmp_path / "fid.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(path)


def test_holdout_is_a_disjoint_part_of_the_training_split(digits_task):
    train_task, (xv, yv) = split_holdout(digits_task, 0.2, seed=0)
    x, _ = digits_task.train
    assert len(xv) == round(0.2 * len(x)) and len(train_task.train[0]) + len(xv) == len(x)
    rows = {tuple(r.tolist()) for r in train_task.train[0].flatten(1)}
    assert not any(tuple(r.tolist()) in rows for r in xv.flatten(1)[:50])
    assert torch.equal(train_task.test[0], digits_task.test[0])  # the test split is untouched


def test_bad_early_stopping_option_is_a_config_error(tmp_path):
    from autocompress.search.run_setup import prepare

    cfg = _cfg(tmp_path, early_stopping={"name": "hyperband", "options": {"no_such_option": 1}})
    with pytest.raises(ConfigError, match=r"fid.yaml: early_stopping.options: bad option for 'hyperband'"):
        prepare(cfg)


def test_old_pruner_key_is_refused_with_the_new_name(tmp_path):
    with pytest.raises(ConfigError) as err:
        _cfg(tmp_path, pruner={"name": "hyperband", "holdout_fraction": 0.3})
    assert str(err.value) == (
        f"{tmp_path / 'fid.yaml'}: pruner: renamed; use early_stopping: (Optuna's early stopping of hopeless "
        "trials; its holdout_fraction is now finetune.holdout_fraction)"
    )
    with pytest.raises(
        ConfigError, match=r"early_stopping.holdout_fraction: moved; use finetune.holdout_fraction$"
    ):
        _cfg(tmp_path, early_stopping={"name": "hyperband", "holdout_fraction": 0.3})
    assert _cfg(tmp_path, finetune={"epochs": 1, "holdout_fraction": 0.3}).finetune.holdout_fraction == 0.3


@pytest.mark.slow
def test_successive_halving_prunes_hopeless_trials_with_their_last_metrics(tmp_path):
    cfg = _cfg(tmp_path)
    summary = run_study(cfg, stop_after=5, log=lambda s: None)
    study = summary.study
    pruned = study.get_trials(states=(TrialState.PRUNED,))
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert pruned and complete
    for t in pruned:
        assert 1 <= t.user_attrs["epochs_done"] <= 3  # pruned at the last epoch: not lowered nor timed
        assert t.user_attrs["val_accuracy"] == t.intermediate_values[max(t.intermediate_values)]
        assert "plan" in t.user_attrs and "prune_reason" in t.user_attrs
        assert not (cfg.output_dir() / "trials" / f"{t.number:05d}").exists()
    for t in complete:
        assert sorted(t.intermediate_values) == [0, 1, 2]  # every epoch was reported
    # early stopping's single-objective twin study shares the storage but is hidden from report/pick
    url = cfg.storage_url()
    assert set(optuna.get_all_study_names(url)) == {"fid", "fid.fidelity"}
    assert study_names(url) == ["fid"]
    twin = optuna.load_study(study_name="fid.fidelity", storage=url)
    assert sorted(t.state.name for t in twin.trials) == sorted(t.state.name for t in study.trials)
