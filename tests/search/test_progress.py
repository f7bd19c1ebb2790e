"""The progress line names the study's metric (accuracy, fidelity, ...), for the trial and the front."""

from __future__ import annotations

import optuna
import pytest

from autocompress.search.progress import Progress


def _study(metric_name: str | None) -> optuna.Study:
    study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    attrs = {"speedup": 2.5, **({"metric_name": metric_name} if metric_name else {})}
    study.add_trial(optuna.trial.create_trial(values=[0.8125, 0.4, 1000.0], user_attrs=attrs))
    return study


def _line(study: optuna.Study, m: dict | None) -> str:
    lines: list[str] = []
    Progress(4, 0, lines.append).trial(study, 1, 0, m, reason="boom")
    assert len(lines) == 1
    return lines[0]


M = {"metric": 0.75, "metric_name": "fidelity", "latency_ms": 0.4, "size_bytes": 2048, "speedup": 1.5}


@pytest.mark.parametrize("name", ["fidelity", "accuracy"])
def test_the_front_is_shown_with_the_studys_metric(name):
    line = _line(_study(name), {**M, "metric_name": name})
    assert f"{name} 0.7500 |" in line
    assert f"fastest feasible 2.50x @ {name} 0.8125" in line


def test_a_failed_trial_names_the_fronts_metric_from_its_trials():
    line = _line(_study("fidelity"), None)
    assert "FAILED: boom" in line
    assert "@ fidelity 0.8125" in line


def test_a_front_without_a_recorded_name_uses_the_trials():
    assert "@ fidelity 0.8125" in _line(_study(None), M)
    assert "@ metric 0.8125" in _line(_study(None), None)
