"""benchmarks/real_models.py without downloads: the budgets with a probe, the two targets and the exit
code, the study's first model matching the best peer, the probe metric, and the hands-off study file
(no space, no warm start, no fine-tune). At the top of tests/, as test_benchmark_peers.py is."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


real = _load("real_models")
checks = sys.modules["_real_checks"]
MNIST = checks.BUDGETS["mobilenet_v2"]
BBC = checks.BUDGETS["mpnet_bbc"]


def row(kind, name, metric, speedup, base=0.98, probe=None, base_probe=0.95, status="ok"):
    r = {"kind": kind, "name": name, "status": status, "metric": metric, "speedup": speedup,
         "drop": base - metric, "drop_rel": (base - metric) / base}  # fmt: skip
    if probe is not None:
        r |= {"probe": probe, "probe_drop": base_probe - probe}
    return r


def test_within_budget_absolute_and_probe():
    assert checks.within(row("peer", "p", 0.9701, 2.0), MNIST)
    assert not checks.within(row("peer", "p", 0.9699, 2.0), MNIST)
    assert not checks.within(row("peer", "p", 0.98, 2.0, status="failed"), MNIST)
    # BBC: 1% relative fidelity AND 1 point of probe accuracy; a row without a probe does not count
    assert checks.within(row("peer", "p", 0.9705, 2.0, base=0.98, probe=0.941), BBC)
    assert not checks.within(row("peer", "p", 0.9705, 2.0, base=0.98, probe=0.939), BBC)
    assert not checks.within(row("peer", "p", 0.9690, 2.0, base=0.98, probe=0.95), BBC)
    assert not checks.within(row("peer", "p", 0.98, 2.0, base=0.98), BBC)


def test_verdict_met_and_exit_zero():
    rows = [
        row("baseline", "float", 0.98, 1.0),
        row("peer", "ort_static", 0.975, 1.2),
        row("peer", "ort_dynamic", 0.90, 3.0),  # fast but outside the budget: not the bar
        row("autocompress", "trial 3", 0.976, 1.9),
        row("autocompress", "trial 5", 0.9705, 2.2),
    ]
    v = checks.verdict(rows, MNIST)
    assert [ok for _, ok, _ in v] == [True, True]
    assert "trial 5 2.20x vs ort_static 1.20x: 1.83x" in v[0][2]
    assert v[1][2] == "trial 3: 1.90x at 0.9760"  # the fastest at an equal or better metric
    assert real.exit_code([{"model": "m", "verdict": v}]) == (0, [])


def test_verdict_missed_by_ratio_and_by_metric():
    rows = [row("peer", "ort_static", 0.975, 1.2), row("autocompress", "trial 1", 0.972, 1.5)]
    v = checks.verdict(rows, MNIST)
    assert [ok for _, ok, _ in v] == [False, False]
    assert "1.25x (target >= 1.5x)" in v[0][2]
    assert "no front model >= 1.20x at a metric >= ort_static's 0.9750" in v[1][2]
    code, missed = real.exit_code([{"model": "m", "verdict": v}])
    assert code == 1 and missed == ["m: 1.5x the best peer", "m: holds the peer's answer"]
    assert real.exit_code([{"model": "m", "verdict": v}], no_targets=True)[0] == 0


def test_verdict_probe_decides_equal_or_better():
    rows = [
        row("baseline", "float", 0.98, 1.0, probe=0.95),
        row("peer", "ort_dynamic", 0.975, 1.1, probe=0.948),
        row("autocompress", "trial 2", 0.976, 2.0, probe=0.945),  # better fidelity, worse probe
    ]
    v = checks.verdict(rows, BBC)
    assert v[0][1] is True and v[1][1] is False
    assert "probe 0.9480" in v[1][2]


def test_verdict_without_front_or_peer():
    none = checks.verdict([row("peer", "p", 0.975, 1.2), row("autocompress", "t", 0.5, 3.0)], MNIST)
    assert [ok for _, ok, _ in none] == [False, False] and "no front model" in none[0][2]
    free = checks.verdict([row("peer", "p", 0.5, 1.2), row("autocompress", "t", 0.975, 1.1)], MNIST)
    assert [ok for _, ok, _ in free] == [True, True] and "nothing to beat" in free[0][2]
    code, missed = real.exit_code([{"model": "x", "error": "the study wrote no baseline"}])
    assert code == 1 and missed == ["x: a verdict"]


def test_first_match_counts_completed_trials_in_order():
    trials = [
        {"number": 0, "end_s": 300.0, "speedup": 1.3, "metric": 0.979},
        {"number": 2, "end_s": 500.0, "speedup": 1.25, "metric": 0.976},  # ran third, ended second
        {"number": 1, "end_s": 650.0, "speedup": 1.1, "metric": 0.98},
        {"number": 3, "end_s": 900.0, "speedup": None, "metric": 0.98},  # no latency recorded
    ]
    peer = {"speedup": 1.2, "metric": 0.975}
    assert checks.first_match(trials, peer) == {"trial": 0, "count": 1, "seconds": 300.0}
    assert checks.first_match(trials, {"speedup": 1.25, "metric": 0.9795}) is None
    assert checks.first_match(trials, {"speedup": 1.05, "metric": 0.98}) == {
        "trial": 1,
        "count": 3,
        "seconds": 650.0,
    }
    assert checks.first_match(trials, None) is None


def test_probe_is_fitted_once_and_applied_unchanged():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 8)) * 4
    y = np.repeat(np.arange(3), 30)
    x = centers[y] + rng.normal(size=(90, 8))
    probe = checks.train_probe(x, y)
    assert checks.probe_accuracy(probe, x, y) == pytest.approx(1.0)
    shuffled = rng.permutation(len(y))
    assert checks.probe_accuracy(probe, x[shuffled], y) < 0.6  # embeddings that lost their content


def test_study_file_is_hands_off(tmp_path):
    args = real.parse_args(
        ["--models", "mpnet_bbc", "--trials", "5", "--timeout-s", "600", "--eval-samples", "40"]
    )
    data = real.study_data("mpnet_bbc", tmp_path, tmp_path / "run", args)
    assert set(data) == {"name", "task", "backend", "budgets", "trials", "output"}
    assert data["trials"] == {"n": 5, "timeout_s": 600.0}
    assert data["budgets"] == {"max_metric_drop_rel": 0.01}
    assert data["task"] == {
        "name": "autocompress.examples.pretrained:mpnet_bbc",
        "options": {"root": str(tmp_path), "eval_samples": 40},
    }
    img = real.study_data("efficientnet_lite0", tmp_path, tmp_path / "run", real.parse_args([]))
    assert (
        img["budgets"] == {"max_metric_drop": 0.01} and img["task"]["options"]["arch"] == "efficientnet_lite0"
    )
    with pytest.raises(SystemExit):
        real.parse_args(["--models", "resnet"])


def test_the_early_answer_goal_scales_with_the_float_latency_and_counts_trials():
    assert checks.early_goal_s(2.0) == 300.0  # a small CNN keeps the 5 minutes
    assert checks.early_goal_s(2 * checks.EARLY_REF_MS) == 600.0  # twice the 22M encoder's float latency
    peer = {"name": "NNCF", "speedup": 1.5, "metric": 0.97}
    name, ok, why = checks.early_verdict({"trial": 1, "count": 2, "seconds": 540.0}, peer, 273.0)
    assert ok and "within 3 trials and 18.3 min" in name and "9.0 min" in why
    assert not checks.early_verdict({"trial": 5, "count": 4, "seconds": 540.0}, peer, 273.0)[1]  # 4 trials
    assert not checks.early_verdict({"trial": 1, "count": 2, "seconds": 400.0}, peer, 40.0)[1]  # > 5 min
    assert not checks.early_verdict(None, peer, 40.0)[1]
    assert checks.early_verdict(None, None, 40.0)[1]  # no peer within the budget: nothing to match
    # no peer within the budget: the first model within it is due early (1% relative of 0.5: 0.495)
    due = checks.budget_stand_in(0.5, checks.BUDGETS["mpnet_bbc"])
    assert due["metric"] == pytest.approx(0.495) and due["speedup"] == 1.0
    assert checks.budget_stand_in(0.98, checks.BUDGETS["mobilenet_v2"])["metric"] == pytest.approx(0.97)
    trials = [{"number": 0, "end_s": 60.0, "speedup": 3.0, "metric": 0.31},
              {"number": 1, "end_s": 120.0, "speedup": 2.2, "metric": 0.4951}]  # fmt: skip
    assert checks.first_match(trials, due) == {"trial": 1, "count": 2, "seconds": 120.0}
    assert not checks.early_verdict(checks.first_match(trials[:1], due), due, 40.0)[1]
    code, missed = real.exit_code([{"model": "m", "verdict": [checks.early_verdict(None, peer, 40.0)]}])
    assert code == 1 and missed == ["m: the peer's answer within 3 trials and 5.0 min"]
