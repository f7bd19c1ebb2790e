"""The measured latency profile on a real (tiny) run: digits CNN of width 8, ONNX Runtime, SQLite."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import ROOT

from autocompress.config import load_config
from autocompress.search import open_run
from autocompress.search.latency_profile import layer_settings, measure_profile, uniform_settings

TIMING = {"warmup_s": 0.02, "min_s": 0.05, "max_s": 0.2}


def tiny_study(tmp_path, **trials) -> dict:
    """A tiny study dict (digits width 8, 1 teacher epoch, 1 fine-tune epoch, random sampler)."""
    return {
        "name": "tiny",
        "task": {"name": "digits", "options": {"width": 8, "teacher_epochs": 1}},
        "space": {"file": str(ROOT / "autocompress/search_spaces/default.yaml")},
        "finetune": {"epochs": 1, "threads": 1},
        "backend": {"options": {"timing": TIMING}},
        "budgets": {"max_metric_drop": 0.01},
        "sampler": {"name": "random"},
        "trials": {"n": 3, **trials},
        "output": str(tmp_path / "run"),
    }


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("profile")
    (tmp / "tiny.yaml").write_text(yaml.safe_dump(tiny_study(tmp, warm_start=[])))
    with open_run(load_config(tmp / "tiny.yaml"), log=lambda s: None) as (ctx, study):
        yield ctx, study


def test_the_budget_leaves_rows_not_measured_and_says_so(run):
    ctx, _ = run
    p = measure_profile(ctx, log=lambda s: None, use_cache=False, trial_s=1.0, budget_trials=0.0)
    skipped = [r for r in p["rows"] if r["status"] == "not measured"]
    assert p["skipped"] == len(skipped) == len(p["rows"]) > 0 and p["lowerings"] == 0
    assert all(r["note"] == "over the profile's budget" for r in skipped)
    assert p["trial_equivalents"] == pytest.approx(p["seconds"])


def test_one_row_per_layer_and_setting_and_equal_structures_timed_once(run):
    ctx, _ = run
    p = measure_profile(ctx, log=lambda s: None, use_cache=False)
    expected = [(i.name, label) for i in ctx.inventory for label, _ in layer_settings(ctx.space, i)]
    expected += [("*", label) for label, _ in uniform_settings(ctx.space, ctx.inventory)]
    assert sorted((r["layer"], r["setting"]) for r in p["rows"]) == sorted(expected)
    assert ("*", "all 8-bit") in expected and ("classifier", "4-bit") in expected
    ok = [r for r in p["rows"] if r["status"] == "ok"]
    assert len(ok) == len(p["rows"]) and p["lowerings"] == len(ok)
    for r in ok:
        assert r["speedup"] > 0 and r["size_bytes"] > 0 and r["metric"] == pytest.approx(r["metric"])
    prints = {r["fingerprint"] for r in ok if r["timed"] not in ("same structure as the baseline",)}
    assert p["timed"] + p["cache_hits"] == len(prints)  # each structure timed once
    same = [r for r in ok if r["timed"] == "same structure as the baseline"]
    assert all(r["speedup"] == 1.0 for r in same)
    assert p["seconds"] > 0 and p["trial_equivalents"] is None
    saved = json.loads((ctx.run_dir / "latency_profile.json").read_text())
    assert saved["key"] == p["key"] and len(saved["rows"]) == len(p["rows"])


def test_second_profile_reuses_every_row_without_lowering(run):
    ctx, _ = run
    first = measure_profile(ctx, log=lambda s: None)
    lines: list[str] = []
    again = measure_profile(ctx, log=lines.append, trial_s=1.0)
    assert again["lowerings"] == 0 and again["timed"] == 0 and again["reused"] == len(first["rows"])
    assert [r["speedup"] for r in again["rows"]] == [r["speedup"] for r in first["rows"]]
    assert "latency profile:" in lines[0] and "0 lowerings" in lines[0] and "trial-equivalents" in lines[0]


def test_planned_starts_are_enqueued_with_their_prediction_and_merged_by_structure(run):
    from optuna.trial import TrialState

    from autocompress.search.planned_starts import enqueue_planned, plan_structure, prediction_errors
    from autocompress.search.planner import Planned, merge_same_structure

    ctx, study = run
    # ONNX Runtime prefers multiples of 8 channels: 30% and 50% of 16 both keep 8 (one model, one trial)
    pruned = [
        Planned(f"{s}", {"features.10": {"sparsity": s, "sparsity_kind": "structured"}}, {})
        for s in (0.3, 0.5)
    ]
    merged = merge_same_structure(
        [*pruned, Planned("int8", {"classifier": {"bits": 8}}, {})], lambda p: plan_structure(ctx, p)
    )
    assert [p.name for p in merged] == ["0.3", "int8"] and merged[0].merged == ["0.5"]
    lines: list[str] = []
    plans = enqueue_planned(ctx, study, 4, lines.append, trial_s=1.0)
    # a one-shot plan (post-training) and a fine-tuned plan of the same structure are two experiments
    assert 1 <= len(plans) <= 4 and len({(plan_structure(ctx, p), p.post_training) for p in plans}) == len(plans)
    assert plans[0].name == "int8 static everywhere" and plans[0].post_training  # the peers' answer first
    assert lines[0].startswith("latency profile:") and "planned start" in lines[1]
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert len(waiting) == len(plans)
    for t, p in zip(waiting, plans, strict=True):
        rec = t.user_attrs["planned"]
        assert rec["name"] == p.name and rec["choices"] == p.choices
        assert {"metric_drop", "speedup", "size_ratio", "size_bytes", "latency_ms"} <= set(rec)
        for layer, fields in p.layers.items():  # the enqueued parameters give the planned layer values
            for dim, value in fields.items():
                name = {"bits": "bits", "sparsity": "sparsity", "rank_ratio": "rank"}.get(dim)
                if name and f"{name}.{layer}" in t.params:
                    assert t.params[f"{name}.{layer}"] == value
    assert study.user_attrs["latency_profile"]["lowerings"] == 0  # the profile came from the run folder
    measured = {**waiting[0].user_attrs, "speedup": 2.0, "metric_drop": 0.0, "size_ratio": 3.0}
    err = prediction_errors(measured)
    assert err["speedup"] == pytest.approx(2.0 - waiting[0].user_attrs["planned"]["speedup"])
    assert prediction_errors({"speedup": 1.0}) is None  # not a planned trial


def test_report_shows_the_profiles_and_planned_trials_predicted_vs_measured(run):
    from optuna.trial import TrialState

    from autocompress.report_html import write_html
    from autocompress.search.runner import execute_trial

    ctx, study = run
    if not study.get_trials(states=(TrialState.WAITING,)):  # run alone: enqueue them here
        from autocompress.search.planned_starts import enqueue_planned

        enqueue_planned(ctx, study, 4, lambda s: None, trial_s=1.0)
    state, metrics, reason = execute_trial(ctx, study, study.ask())  # the first planned trial
    assert state == TrialState.COMPLETE, reason
    html = write_html(study, ctx.run_dir).read_text()
    assert "<h3>Profiles: measured latency and accuracy per layer x setting</h3>" in html
    assert 'alt="profile"' in html and (ctx.run_dir / "profile.png").exists()
    assert "(layer, setting) rows, each the teacher with only that change" in html
    assert "<h4>Planned trials: predicted vs measured</h4>" in html
    assert "Mean absolute error over 1 completed: speedup" in html
    assert f"{metrics['speedup']:.4g}" in html  # the measured speedup is in the planned table


def test_a_group_is_profiled_as_one_row_per_setting_and_planned_as_one_choice(tmp_path):
    from autocompress.search.latency_profile import units
    from autocompress.search.planner import options

    study = tiny_study(tmp_path, warm_start=[])
    study["space"]["overrides"] = {"groups": {"body": "features\\.(3|6)"}}
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(study))
    with open_run(load_config(tmp_path / "g.yaml"), log=lambda s: None) as (ctx, _):
        assert [m.name for m in dict(units(ctx.space, ctx.inventory))["body"]] == ["features.3", "features.6"]
        p = measure_profile(ctx, log=lambda s: None, use_cache=False)
    group = [r for r in p["rows"] if r["layer"] == "body"]
    alone = {i.name: layer_settings(ctx.space, i) for i in ctx.inventory}
    assert sorted(r["setting"] for r in group) == sorted(label for label, _ in alone["features.3"])
    for r in group:  # both members changed together, each with its own fields, in one lowering
        assert r["members"] == ["features.3", "features.6"] and r["status"] == "ok"
        assert r["values"] == {n: dict(alone[n])[r["setting"]] for n in r["members"]}
    assert not [r for r in p["rows"] if r["layer"] in ("features.3", "features.6")]  # no member rows
    assert {r["layer"] for r in p["rows"]} == {"*", "body", "features.0", "features.10", "classifier"}
    _, opts = options(p, ctx.space)
    body = [o for o in opts if o.unit == "body"]
    assert {o.label for o in body} == {r["setting"] for r in group}
    row = next(r for r in group if r["setting"] == body[0].label)
    assert body[0].fields == row["values"] and body[0].dlat == pytest.approx(1 / row["speedup"] - 1)
