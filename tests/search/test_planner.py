"""The planner's additive model and greedy knapsack on a hand-made profile (pure: no model, no backend)."""

from __future__ import annotations

import pytest

from autocompress.search.planner import (
    Planned,
    greedy,
    merge_same_structure,
    options,
    plan_candidates,
    predict,
)
from autocompress.space import SearchSpace

BASE = {"metric": 0.9, "latency_ms": 1.0, "size_bytes": 1000}


def _row(layer, setting, speedup, drop, size_ratio, values):
    return {
        "layer": layer,
        "setting": setting,
        "values": values,
        "status": "ok",
        "speedup": speedup,
        "metric_drop": drop,
        "size_ratio": size_ratio,
    }


def _profile() -> dict:
    s = {"sparsity": 0.5, "sparsity_kind": "structured"}
    rows = [
        _row("*", "all 8-bit", 1.25, 0.001, 4.0, {"a": {"bits": 8}, "b": {"bits": 8}}),
        _row("a", "8-bit", 0.9, 0.0, 1.5, {"bits": 8}),
        _row("a", "structured 0.5", 1.25, 0.004, 1.3, s),  # saves 20% of the time for 0.004
        _row("b", "structured 0.5", 1.1, 0.02, 1.2, s),  # saves 9% for 0.02
        _row("b", "4-bit", 0.8, 0.001, 1.6, {"bits": 4}),  # smaller, slower
        {"layer": "b", "setting": "rank 0.5", "values": {}, "status": "not measured"},
    ]
    return {"rows": rows, "baseline": BASE}


def test_prediction_of_a_base_and_choices():
    bases, opts = options(_profile(), SearchSpace.from_dict({}))
    int8 = next(b for b in bases if b.label == "all 8-bit")
    a = next(o for o in opts if o.unit == "a" and o.label == "structured 0.5")
    pred = predict(int8, [a], BASE)
    assert pred["speedup"] == pytest.approx(1 / (0.8 * 0.8))  # 0.8 (int8) x (1 - 0.2)
    assert pred["metric_drop"] == pytest.approx(0.005)
    assert pred["size_ratio"] == pytest.approx(1 / (0.25 * (1 - (1 - 1 / 1.3))))
    assert {o.label for o in opts} == {"8-bit", "structured 0.5", "4-bit"}  # not measured: not an option


def test_greedy_keeps_the_drop_within_the_budget_and_prefers_gain_per_drop():
    bases, opts = options(_profile(), SearchSpace.from_dict({}))
    int8 = next(b for b in bases if b.label == "all 8-bit")
    assert [o.unit for o in greedy(int8, opts, 0.006, "dlat")] == ["a"]
    assert {o.unit for o in greedy(int8, opts, 0.03, "dlat")} == {"a", "b"}
    assert greedy(int8, opts, 0.0005, "dlat") == []  # nothing fits besides the base (0.001 > budget)
    size = greedy(bases[0], opts, 0.01, "dsize")  # float base: per-layer bits allowed, one per layer
    assert sorted((o.unit, o.label) for o in size) == [("a", "8-bit"), ("b", "4-bit")]


def test_plans_at_several_budgets_and_the_size_plan():
    space = SearchSpace.from_dict({"sparsity": {"low": 0.0, "high": 0.9, "step": 0.05}})
    plans = plan_candidates(_profile(), space, 0.01)
    names = [p.name for p in plans]
    speed = [f"speed, drop <= {f}x budget" for f in (1, 4, 16, 64)]
    uniform_names = ["uniform structured 0.5", "uniform structured 0.7"]
    assert names == speed[:3] + uniform_names + speed[3:] + ["size, drop <= 1x budget"]
    uniform = plans[3]  # the fastest base with the same channel removal on every layer, outside budgets
    assert uniform.layers == {u: {"bits": 8, "sparsity": 0.5, "sparsity_kind": "structured"} for u in "ab"}
    assert uniform.predicted["metric_drop"] == pytest.approx(0.001 + 0.004 + 0.02)
    assert uniform.predicted["speedup"] == pytest.approx(1 / (0.8 * 0.8 * (1 / 1.1)))
    # one more, halfway from the profile's highest level (0.5) to the domain's top (0.9), predicted
    # from the 0.5 rows (a lower bound) and saying so
    further = plans[4]
    assert further.layers == {u: {"bits": 8, "sparsity": 0.7, "sparsity_kind": "structured"} for u in "ab"}
    assert further.predicted["extrapolated_from"] == "structured 0.5"
    assert further.predicted["speedup"] == pytest.approx(uniform.predicted["speedup"])
    first = plans[0]
    assert first.choices == ["all 8-bit", "a structured 0.5"]
    assert first.layers == {
        "a": {"bits": 8, "sparsity": 0.5, "sparsity_kind": "structured"},
        "b": {"bits": 8},
    }
    assert first.predicted["metric_drop"] <= first.predicted["budget"] == 0.01
    assert plans[1].predicted["speedup"] > first.predicted["speedup"]


def test_beyond_the_profile_lies_halfway_to_the_top_of_the_domain_on_its_grid():
    from autocompress.domain import Param
    from autocompress.search.planner import beyond

    assert beyond(Param(low=0.0, high=0.7, step=0.05), 0.5) == pytest.approx(0.6)
    assert beyond(Param(low=0.0, high=0.6, step=0.05), 0.5) == pytest.approx(0.55)
    assert beyond(Param(low=0.0, high=0.5, step=0.05), 0.5) is None  # the profile reached the top
    assert beyond(Param(low=0.0, high=0.55, step=0.1), 0.5) is None  # the grid has nothing above 0.5
    assert beyond(Param(choices=[0.0, 0.25, 0.5, 0.625, 0.75]), 0.5) == 0.625
    assert beyond(Param(choices=[0.0, 0.125, 0.25, 0.375]), 0.375) is None
    assert beyond(Param(fixed=0.5), 0.5) is None
    # a profile already at the domain's top plans no extra uniform level
    space = SearchSpace.from_dict({"sparsity": {"low": 0.0, "high": 0.5, "step": 0.05}})
    names = [p.name for p in plan_candidates(_profile(), space, 0.01)]
    assert [n for n in names if n.startswith("uniform")] == ["uniform structured 0.5"]


def test_uniform_plans_prune_heads_and_cover_levels_the_profile_could_not_measure():
    from autocompress.search.planner import heads_at

    s = lambda v: {"sparsity": v, "sparsity_kind": "structured"}  # noqa: E731
    profile = _profile()
    profile["rows"] += [  # FFN-like layer "c": its rows over the profile's budget; "o" an attention output
        {"layer": "c", "setting": f"structured {v:g}", "values": s(v), "status": "not measured"}
        for v in (0.25, 0.75)
    ] + [{"layer": "o", "setting": "8-bit", "values": {"bits": 8}, "status": "not measured"}]
    space = SearchSpace.from_dict(
        {
            "sparsity": {"choices": [0.0, 0.25, 0.5, 0.75]},
            "layers": {"o": {"heads_kept": {"choices": [1.0, 0.75, 0.5]}}},
        }
    )
    assert heads_at(space, ["a", "o"], 0.25) == {"o": {"heads_kept": 0.75}}
    assert heads_at(space, ["o"], 0.75) == {"o": {"heads_kept": 0.5}}  # the harshest offered
    plans = {p.name: p for p in plan_candidates(profile, space, 0.01)}
    measured = plans["uniform structured 0.5"]
    assert measured.layers["o"] == {"heads_kept": 0.5} and "unprofiled" not in measured.predicted
    quarter = plans["uniform structured 0.25"]  # only "c" has rows at 0.25, none measured
    assert quarter.predicted["unprofiled"] is True
    assert quarter.layers == {
        "a": {"bits": 8},
        "b": {"bits": 8},
        "c": s(0.25),
        "o": {"heads_kept": 0.75},
    }
    assert quarter.predicted["speedup"] == pytest.approx(1.25)  # the base's own figure
    assert quarter.choices[-1] == "heads 0.75 on 1 attention"
    assert "uniform structured 0.75" in plans  # the other unmeasured level


def test_plans_with_the_same_structure_are_merged():
    plans = [Planned("p1", {"a": {}}, {}), Planned("p2", {"a": {}}, {}), Planned("p3", {"b": {}}, {})]
    merged = merge_same_structure(plans, lambda p: "same" if p.name != "p3" else "other")
    assert [p.name for p in merged] == ["p1", "p3"] and merged[0].merged == ["p2"]


def test_grouped_layers_choose_together():
    profile = _profile()
    space = SearchSpace.from_dict({"groups": "global"})
    _, opts = options(profile, space)
    # only settings measured on every member of the group are options of the group
    assert [(o.unit, o.label) for o in opts] == [("all", "structured 0.5")]
    assert set(opts[0].fields) == {"a", "b"}


def test_planned_starts_are_the_default_without_warm_start(tmp_path):
    import yaml

    from autocompress.config import TrialsConfig, load_config
    from autocompress.errors import ConfigError

    assert TrialsConfig().starts() == ([], 8)  # no warm_start in the file: planned starts, no int8 default
    given = TrialsConfig(warm_start=[{"bits": 8}])
    assert len(given.starts()[0]) == 1 and given.starts()[1] == 0
    assert TrialsConfig(planned_starts=0).starts()[0][0].bits == 8  # off: the old default warm start
    assert TrialsConfig(warm_start=[], planned_starts=2).starts() == ([], 2)
    path = tmp_path / "s.yaml"
    path.write_text(
        yaml.safe_dump({"name": "s", "task": {"name": "digits"}, "trials": {"planned_starts": 99}})
    )
    with pytest.raises(
        ConfigError, match=r"s.yaml: trials.planned_starts: must be 'auto' or a count from 0 to 20"
    ):
        load_config(path)


def test_uniform_plans_build_on_the_fastest_base_within_the_budget():
    """A whole-model int8 that broke the model (static int8 on an encoder with outliers: 69% lost) is
    not the base of the channel-removal plans; the slower one within the budget is, else float."""
    prof = _profile()
    prof["rows"][0] = _row("*", "all 8-bit", 2.8, 0.69, 4.0, {"a": {"bits": 8}, "b": {"bits": 8}})
    prof["rows"].append(
        _row("*", "all 8-bit dynamic", 2.3, 0.008, 3.0, {"a": {"bits": 8, "quant": "dynamic"}})
    )
    space = SearchSpace.from_dict({"sparsity": {"low": 0.0, "high": 0.5, "step": 0.05}})
    uniform = {p.name: p for p in plan_candidates(prof, space, 0.01)}["uniform structured 0.5"]
    assert uniform.choices[0] == "all 8-bit dynamic"
    assert uniform.layers["a"] == {
        "bits": 8,
        "quant": "dynamic",
        "sparsity": 0.5,
        "sparsity_kind": "structured",
    }
    prof["rows"].pop()  # no base within the budget: float
    uniform = {p.name: p for p in plan_candidates(prof, space, 0.01)}["uniform structured 0.5"]
    assert uniform.choices[0] == "float" and "bits" not in uniform.layers["a"]
