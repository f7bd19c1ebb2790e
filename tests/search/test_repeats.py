"""A plan that builds a model already measured is not run again: its canonical form, and the repeat
recorded in a real study (digits CNN, ONNX Runtime, SQLite)."""

from __future__ import annotations

import yaml
from conftest import ROOT
from optuna.trial import TrialState

from autocompress.config import load_config
from autocompress.export import front_records
from autocompress.plan import LayerPlan, Plan, Schedule
from autocompress.search import open_run
from autocompress.search.repeats import canonical_plan, plan_key
from autocompress.search.runner import complete_count, execute_trial


def _plan(layers: dict, **kw) -> dict:
    return Plan(layers={k: LayerPlan(**v) for k, v in layers.items()}, **kw).to_dict()


def test_settings_that_change_nothing_do_not_change_the_key():
    post = {"epochs": 0}
    a = _plan(
        {"fc": {"bits": 8}}, kd_temperature=2.0, kd_alpha=0.1, schedule=Schedule("cubic", 0.1, 0.6), **post
    )
    b = _plan(
        {"fc": {"bits": 8}, "conv": {"quant_scheme": "asymmetric"}}, lr=0.5, **post
    )  # a float layer's grid
    assert plan_key(a) == plan_key(b)
    assert canonical_plan(a)["layers"] == {"fc": {**LayerPlan(bits=8).to_dict()}}
    assert "schedule" not in canonical_plan(a) and "kd_alpha" not in canonical_plan(a)
    assert plan_key(a) != plan_key(_plan({"fc": {"bits": 8, "quant_mode": "dynamic"}}, **post))
    assert plan_key(a) != plan_key(_plan({"fc": {"bits": 8}}, epochs=1))  # fine-tuned: other weights
    tuned = _plan({"fc": {"bits": 8}}, epochs=1, kd_alpha=0.1)
    assert plan_key(tuned) != plan_key(_plan({"fc": {"bits": 8}}, epochs=1, kd_alpha=0.9))
    # the schedule reaches the sparsity only where something is removed
    ones = [
        _plan({"fc": {"sparsity": 0.5, "sparsity_kind": "structured"}}, epochs=1, schedule=Schedule(k))
        for k in ("one_shot", "cubic")
    ]
    assert plan_key(ones[0]) != plan_key(ones[1])
    assert plan_key(_plan({"fc": {"bits": 8}}, epochs=1, schedule=Schedule("cubic"))) == plan_key(
        _plan({"fc": {"bits": 8}}, epochs=1, schedule=Schedule("one_shot"))
    )
    unpruned = _plan(
        {"fc": {"sparsity": 0.0, "sparsity_kind": "structured", "rank_ratio": 1.0, "rank_mode": "energy"}}
    )
    assert plan_key(unpruned) == plan_key(_plan({}))


def test_a_repeated_plan_records_the_earlier_trial_and_runs_nothing(tmp_path):
    study = {
        "name": "rep",
        "task": {"name": "digits", "options": {"width": 8, "teacher_epochs": 1}},
        "space": {"file": str(ROOT / "autocompress/search_spaces/default.yaml")},
        "finetune": {"epochs": 0, "threads": 1},
        "backend": {"options": {"timing": {"warmup_s": 0.02, "min_s": 0.05, "max_s": 0.2}}},
        "budgets": {"max_metric_drop": 0.05},
        "sampler": {"name": "random"},
        "trials": {"n": 2, "warm_start": []},
        "output": str(tmp_path / "run"),
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(study))
    with open_run(load_config(tmp_path / "r.yaml"), log=lambda s: None) as (ctx, st):
        params = ctx.space.params_for(
            ctx.inventory, bits=8, quant_mode="static", rank_ratio=1.0, sparsity=0.0
        )
        for temperature in (2.0, 9.0):  # distillation settings of a plan that does not fine-tune
            st.enqueue_trial({**params, "kd.temperature": temperature, "schedule.kind": "cubic"})
        first = execute_trial(ctx, st, st.ask())
        state, metrics, reason = execute_trial(ctx, st, st.ask())
        assert first[0] == state == TrialState.COMPLETE, reason
        a, b = st.get_trials()
        assert a.params["kd.temperature"] != b.params["kd.temperature"]
        assert b.user_attrs["repeat_of"] == a.number and "repeat_of" not in a.user_attrs
        assert b.values == a.values and b.user_attrs["artifact"] == a.user_attrs["artifact"]
        assert b.user_attrs["speedup"] == a.user_attrs["speedup"] and b.constraints == a.constraints
        assert b.user_attrs["seconds"]["total"] < a.user_attrs["seconds"]["total"]
        assert not (ctx.run_dir / "trials" / f"{b.number:05d}").exists()  # nothing built, lowered or timed
        assert complete_count(st) == 1  # trials.n counts models measured
        assert [r["trial"] for r in front_records(st)] == [a.number]  # the model is exported once
