from __future__ import annotations

import optuna
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autocompress.errors import ConfigError
from autocompress.inventory import LayerInfo
from autocompress.pareto import constraint_values, pareto_mask, pick, within_budgets
from autocompress.plan import LayerPlan, Plan, Schedule
from autocompress.space import SearchSpace

INV = [
    LayerInfo("features.0", "Conv2d", 1, 8, (3, 3), 1, 72, 4608, 8),
    LayerInfo("classifier", "Linear", 32, 10, (1,), 1, 330, 320, 10),
]
ROOT_SPACE = "autocompress/search_spaces/default.yaml"


# -- plan ---------------------------------------------------------------------------------------
layer_plans = st.builds(
    LayerPlan, bits=st.sampled_from([4, 8, 32]), sparsity=st.floats(0, 0.99), rank_ratio=st.floats(0.01, 1.0)
)
plans = st.builds(
    Plan,
    layers=st.dictionaries(st.from_regex(r"[a-z]+(\.[0-9]+)?", fullmatch=True), layer_plans, max_size=5),
    schedule=st.builds(
        lambda k, a, b: Schedule(k, min(a, b), max(a, b)),
        st.sampled_from(["one_shot", "linear", "cubic"]),
        st.floats(0, 1),
        st.floats(0, 1),
    ),
    kd_temperature=st.floats(1, 20),
    kd_alpha=st.floats(0, 1),
    epochs=st.integers(0, 5),
)


@given(plans)
@settings(max_examples=60, deadline=None)
def test_plan_json_round_trip(plan):
    again = Plan.from_json(plan.to_json())
    assert again == plan
    assert again.fingerprint() == plan.fingerprint()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"layers": {"a": LayerPlan(bits=7)}},
            r"layers.a.bits: bits 7 is not one of \[2, 3, 4, 5, 6, 8, 16, 32\]",
        ),
        ({"layers": {"a": LayerPlan(sparsity=1.0)}}, r"layers.a.sparsity: sparsity 1.0 is outside \[0, 1\)"),
        (
            {"layers": {"a": LayerPlan(rank_ratio=0.0)}},
            r"layers.a.rank_ratio: rank_ratio 0.0 is outside \(0, 1\]",
        ),
        ({"kd_temperature": 0.5}, "kd_temperature 0.5 must be >= 1"),
        ({"schedule": Schedule("linear", 0.8, 0.2)}, "start <= end"),
    ],
)
def test_plan_rejects_impossible_values(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        Plan(**kwargs)


# -- space --------------------------------------------------------------------------------------
def test_default_space_parameter_names_are_stable():
    space = SearchSpace.from_file(ROOT_SPACE)
    study = optuna.create_study(directions=["maximize", "minimize"])
    trial = study.ask()
    plan = space.suggest(trial, INV, epochs=2, lr=1e-3, seed=0)
    assert set(trial.params) == {
        "bits.features.0",
        "sparsity.features.0",
        "rank.features.0",
        "sparsity_kind.features.0",
        "bits.classifier",
        "sparsity.classifier",
        "rank.classifier",
        "sparsity_kind.classifier",
        "schedule.kind",
        "schedule.start",
        "schedule.end",
        "kd.temperature",
        "kd.alpha",
        # static or dynamic int8: asked of a Linear layer only, and only when its bits are 8
        *(["qmode.classifier"] if trial.params["bits.classifier"] == 8 else []),
    }
    assert plan.layer("classifier").bits == trial.params["bits.classifier"]
    assert 1.0 <= plan.kd_temperature <= 20.0 and plan.schedule.start <= plan.schedule.end


def test_fixed_trial_gives_the_same_plan_and_overrides_apply():
    space = SearchSpace.from_file(
        ROOT_SPACE, {"layers": {"class.*": {"rank_ratio": {"fixed": 1.0}}}, "kd": {"alpha": {"fixed": 0.25}}}
    )
    params = {
        "bits.features.0": 8,
        "sparsity.features.0": 0.5,
        "rank.features.0": 0.5,
        "bits.classifier": 4,
        "sparsity.classifier": 0.0,
        "sparsity_kind.features.0": "structured",
        "sparsity_kind.classifier": "unstructured",
        "schedule.kind": "cubic",
        "schedule.start": 0.1,
        "schedule.end": 0.9,
        "kd.temperature": 3.0,
    }
    plan = space.suggest(optuna.trial.FixedTrial(params), INV, epochs=1, lr=1e-3, seed=0)
    assert plan.layer("features.0") == LayerPlan(
        bits=8, sparsity=0.5, rank_ratio=0.5, sparsity_kind="structured"
    )
    assert plan.layer("classifier") == LayerPlan(
        bits=4, sparsity=0.0, rank_ratio=1.0
    )  # rank fixed by the override
    assert plan.kd_alpha == 0.25 and plan.schedule == Schedule("cubic", 0.1, 0.9)


def test_warm_start_params_only_set_searched_dimensions():
    space = SearchSpace.from_file(ROOT_SPACE, {"layers": {"classifier": {"bits": {"fixed": 32}}}})
    params = space.params_for(INV, bits=8, rank_ratio=0.5)
    assert params == {
        "bits.features.0": 8,
        "sparsity.features.0": 0.0,
        "rank.features.0": 0.5,
        "sparsity.classifier": 0.0,
        "rank.classifier": 0.5,
    }


def test_warm_start_values_land_on_the_step_grid_inside_the_range():
    # 0.5 + 7 * 0.05 is 0.8500000000000001 in floats: past the range's end, Optuna warned and kept it
    space = SearchSpace.from_file(
        ROOT_SPACE, {"sparsity": {"low": 0.5, "high": 0.85, "step": 0.05}, "layers": {}}
    )
    params = space.params_from_layers(
        INV, {"features.0": {"sparsity": 0.85}, "classifier": {"sparsity": 0.62}}
    )
    assert params["sparsity.features.0"] == 0.85
    assert params["sparsity.classifier"] == 0.6
    dist = optuna.distributions.FloatDistribution(0.5, 0.85, step=0.05)
    assert all(dist._contains(v) for k, v in params.items() if k.startswith("sparsity."))


def test_warm_start_plan_wide_settings_only_when_searched_and_admissible():
    space = SearchSpace.from_file(ROOT_SPACE, {"kd": {"alpha": {"fixed": 0.5}}})
    assert space.plan_params(schedule_kind="one_shot", kd_temperature=4.0, kd_alpha=0.9) == {
        "schedule.kind": "one_shot",
        "kd.temperature": 4.0,
    }  # alpha is fixed by the override: the warm start cannot set it
    # outside [1, 20]: left to the sampler
    assert space.plan_params(kd_temperature=50.0, schedule_kind=None) == {}


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"bits": {"choices": [7, 8]}}, r"bits: 7 is not an allowed bit width"),
        ({"sparsity": {"low": 0.0, "high": 1.0}}, r"sparsity: 1.0 is outside \[0, 1\)"),
        ({"rank_ratio": {"low": 0.0, "high": 1.0}}, r"rank_ratio: 0.0 is outside \(0, 1\]"),
        ({"bitz": {"choices": [8]}}, r"bitz: unknown key \(did you mean 'bits'\?\)"),
        ({"bits": {"choices": [8], "low": 1}}, r"bits: .*exactly one of"),
        ({"layers": {"(": {"bits": {"fixed": 8}}}}, r"layers.\(: invalid regex"),
        ({"schedule": {"kind": {"choices": ["sudden"]}}}, r"schedule.kind: 'sudden' is not one of"),
        ({"kd": {"temperature": {"low": 0.5, "high": 4}}}, r"kd.temperature: values must be >= 1"),
    ],
)
def test_space_errors_name_the_field(data, match):
    with pytest.raises(ConfigError, match=match):
        SearchSpace.from_dict(data, "space.yaml")


# -- pareto -------------------------------------------------------------------------------------
points_st = st.lists(
    st.fixed_dictionaries(
        {
            "metric": st.integers(0, 10).map(lambda v: v / 10),
            "latency_ms": st.integers(1, 10).map(float),
            "size_bytes": st.integers(1, 10),
        }
    ),
    min_size=1,
    max_size=25,
)


def _dominates(a, b):
    ge = (
        a["metric"] >= b["metric"]
        and a["latency_ms"] <= b["latency_ms"]
        and a["size_bytes"] <= b["size_bytes"]
    )
    gt = a["metric"] > b["metric"] or a["latency_ms"] < b["latency_ms"] or a["size_bytes"] < b["size_bytes"]
    return ge and gt


@given(points_st)
@settings(max_examples=100, deadline=None)
def test_pareto_mask_properties(points):
    mask = pareto_mask(points)
    front = [p for p, m in zip(points, mask, strict=True) if m]
    assert front
    for p in front:
        assert not any(_dominates(q, p) for q in points)
    for p, m in zip(points, mask, strict=True):
        if not m:
            assert any(_dominates(q, p) for q in front)


@given(points_st, st.floats(1, 10), st.integers(1, 10))
@settings(max_examples=100, deadline=None)
def test_pick_respects_budgets(points, max_lat, max_size):
    pts = [dict(p, accuracy_drop=1 - p["metric"]) for p in points]
    chosen = pick(pts, max_latency_ms=max_lat, max_size_bytes=max_size)
    fitting = [p for p in pts if p["latency_ms"] <= max_lat and p["size_bytes"] <= max_size]
    if not fitting:
        assert chosen is None
    else:
        assert within_budgets(chosen, max_latency_ms=max_lat, max_size_bytes=max_size)
        assert chosen["metric"] == max(p["metric"] for p in fitting)


def test_constraint_values_only_for_set_budgets():
    m = {"metric_drop": 0.02, "latency_ms": 1.5, "size_bytes": 1000}
    assert constraint_values(
        m, {"max_metric_drop": 0.01, "max_latency_ms": None, "max_size_bytes": 2000}
    ) == {"metric_drop": pytest.approx(0.01), "size_bytes": pytest.approx(-1000.0)}


def test_a_budget_met_exactly_is_met_by_both_rules():
    # 10 of 1000 samples lost: 0.988 - 0.978 is 0.010000000000000009 in floating point
    m = {"metric_drop": 0.988 - 0.978, "metric_drop_rel": (0.988 - 0.978) / 0.988, "latency_ms": 0.1 + 0.2}
    m["size_bytes"] = 1000
    assert m["metric_drop"] > 0.01
    budgets = {"max_metric_drop": 0.01, "max_metric_drop_rel": 0.01 / 0.988, "max_latency_ms": 0.3}
    budgets["max_size_bytes"] = 1000
    assert all(v <= 0 for v in constraint_values(m, budgets).values())  # feasible, on the front
    assert within_budgets(m, **budgets)  # and picked
    # one sample more is over, by both rules
    worse = dict(m, metric_drop=0.988 - 0.977)
    assert constraint_values(worse, budgets)["metric_drop"] > 0
    assert not within_budgets(worse, **budgets)
    assert not within_budgets(dict(m, size_bytes=1001), **budgets)


def test_layer_groups_share_parameters():
    inv = [*INV, LayerInfo("features.3", "Conv2d", 8, 16, (3, 3), 1, 1152, 1, 8)]
    grouped = SearchSpace.from_file(ROOT_SPACE, {"groups": {"convs": r"features\..*"}})
    trial = optuna.create_study().ask()
    plan = grouped.suggest(trial, inv, epochs=1, lr=1e-3, seed=0)
    assert {k for k in trial.params if k.startswith("bits.")} == {"bits.convs", "bits.classifier"}
    assert plan.layer("features.0") == plan.layer("features.3")
    everything = SearchSpace.from_file(ROOT_SPACE, {"groups": "global"})
    trial = optuna.create_study().ask()
    plan = everything.suggest(trial, inv, epochs=1, lr=1e-3, seed=0)
    assert {k for k in trial.params if k.startswith("rank.")} == {"rank.all"}
    assert len({plan.layer(i.name).bits for i in inv}) == 1
    assert everything.params_for(inv, bits=8)["bits.all"] == 8


def test_layer_groups_with_conflicting_domains_are_rejected():
    space = SearchSpace.from_file(
        ROOT_SPACE, {"groups": "global", "layers": {"classifier": {"bits": {"choices": [8, 32]}}}}
    )
    with pytest.raises(ConfigError, match="layers 'features.0' and 'classifier' share 'bits.all'"):
        space.suggest(optuna.create_study().ask(), INV, epochs=1, lr=1e-3, seed=0)
