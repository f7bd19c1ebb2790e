"""The third one-shot plan: int8 static everywhere but the units most sensitive to it, kept float, planned
from the profile's 8-bit rows (the default space, hand-made profile rows)."""

from __future__ import annotations

import pytest
from conftest import ROOT

from autocompress.search.one_shot_mixed import MAX_FLOAT_MACS, NEARLY_LOSSLESS, WELL_INSIDE, mixed_plan

BASELINE = {"metric": 0.98, "latency_ms": 2.0, "size_bytes": 4000}


def _info(name, kind, macs):
    from autocompress.inventory import LayerInfo

    fields = {f: None for f in LayerInfo.__dataclass_fields__}
    return LayerInfo(**{**fields, "name": name, "kind": kind, "macs": macs})


@pytest.fixture(scope="module")
def space():
    from autocompress.space import SearchSpace

    return SearchSpace.from_file(ROOT / "autocompress/search_spaces/default.yaml")


INVENTORY = [_info(f"c{i}", "Conv2d", 100) for i in range(8)] + [_info("fc", "Linear", 20)]


def _row(layer, drop, speedup, **extra):
    return {
        "layer": layer,
        "setting": "8-bit",
        "status": "ok",
        "metric_drop": drop,
        "speedup": speedup,
        **extra,
    }


def _profile(drops: dict[str, float], whole_drop: float | None = 0.012) -> dict:
    rows = [_row(n, d, 1.1) for n, d in drops.items()]
    if whole_drop is not None:
        rows.append(
            {
                **_row("*", whole_drop, 2.5),
                "setting": "all 8-bit",
                "size_ratio": 3.5,
                "latency_ms": 0.8,
                "size_bytes": 1143,
            }
        )
    return {"rows": rows, "baseline": BASELINE}


def test_the_layers_with_the_largest_measured_int8_drop_stay_float_post_training(space):
    drops = {
        "c0": 0.0,
        "c1": 0.004,
        "c2": -0.001,
        "c3": 0.0005,
        "c4": 0.0,
        "c5": 0.0045,
        "c6": 0.0,
        "fc": 0.0,
    }
    plan = mixed_plan(space, INVENTORY, _profile(drops), allowed_drop=0.01)
    assert plan is not None and plan.post_training
    assert sorted({i.name for i in INVENTORY} - set(plan.layers)) == ["c1", "c5"]
    assert all(plan.layers[n] == {"bits": 8} for n in plan.layers)  # every other layer int8 static
    assert "c7" in plan.layers  # not profiled at 8 bits: stays int8
    assert plan.name == "int8 static, 2 sensitive layers float"
    assert plan.choices[0].startswith("int8 static, 2 sensitive layers float (c5, c1; 7 layers int8)")
    # the whole-model drop (0.012, over the budget) shared in proportion: 0.0005 / 0.009 of it is left
    assert plan.predicted["metric_drop"] == pytest.approx(0.012 * 0.0005 / 0.009)
    assert plan.predicted["metric_drop"] <= WELL_INSIDE * 0.01
    # the two float layers give their one-layer speedups back: 2.5 / 1.1 / 1.1
    assert plan.predicted["speedup"] == pytest.approx(2.5 / 1.1**2)


def test_a_mixed_plan_that_measured_more_drop_keeps_more_layers_float(space):
    """The first mixed plan measured 5x its predicted drop: the next one scales every prediction by it."""
    drops = {"c0": 0.0, "c1": 0.004, "fc": 0.001, "c3": 0.0005, "c5": 0.0045}
    first = mixed_plan(space, INVENTORY, _profile(drops), allowed_drop=0.01)
    assert sorted({i.name for i in INVENTORY} - set(first.layers)) == ["c1", "c5"]
    again = mixed_plan(space, INVENTORY, _profile(drops), allowed_drop=0.01, scale=5.0)
    assert sorted({i.name for i in INVENTORY} - set(again.layers)) == ["c1", "c5", "fc"]
    # 5 x 0.012 x 0.0005 / 0.01 = 0.003 <= half the budget (fc float too); c1, c5 alone: 5 x 0.0018 > it
    assert again.predicted["metric_drop"] == pytest.approx(5 * 0.012 * 0.0005 / 0.01)
    assert again.predicted["metric_drop"] <= WELL_INSIDE * 0.01


def test_within_the_budget_it_aims_at_nearly_lossless(space):
    drops = {"c0": 0.002, "c1": 0.001, "c2": 0.0004, "c3": 0.0001}
    loose = mixed_plan(space, INVENTORY, _profile(drops, whole_drop=0.006), allowed_drop=0.01)
    floated = sorted({i.name for i in INVENTORY} - set(loose.layers))
    assert floated == ["c0", "c1"]  # 0.006 * 0.0005 / 0.0035 = 0.00086 <= 0.1 x budget
    assert loose.predicted["metric_drop"] <= NEARLY_LOSSLESS * 0.01


def test_drop_per_latency_saved_ranks_and_the_macs_cap_holds(space):
    # c0 loses a little but saves nothing alone: float first; c1 loses more but is the fastest in int8
    rows = [_row("c0", 0.002, 1.0), _row("c1", 0.003, 2.0), _row("c2", 0.001, 1.5)]
    rows.append(
        {
            **_row("*", 0.006, 2.5),
            "setting": "all 8-bit",
            "size_ratio": 3.5,
            "latency_ms": 0.8,
            "size_bytes": 1143,
        }
    )
    plan = mixed_plan(space, INVENTORY, {"rows": rows, "baseline": BASELINE}, allowed_drop=0.004)
    assert sorted({i.name for i in INVENTORY} - set(plan.layers)) == ["c0", "c1"]
    assert plan.choices[0].startswith("int8 static, 2 sensitive layers float (c0, c1;")
    # a group over the MACs cap is skipped, a smaller one taken instead
    big = {**_row("g", 0.01, 1.2), "members": [f"c{i}" for i in range(4)]}
    plan = mixed_plan(space, INVENTORY, {"rows": [big, _row("c5", 0.001, 1.1)], "baseline": BASELINE}, 0.01)
    assert MAX_FLOAT_MACS * 820 < 400 and set(plan.layers) == {i.name for i in INVENTORY} - {"c5"}
    assert plan.predicted.get("unprofiled")  # no whole-model row: the one-unit drops summed


def test_no_plan_when_no_layer_loses_anything_measurable_at_int8(space):
    drops = {"c0": 0.0, "c1": -0.002, "c2": 0.0}
    assert mixed_plan(space, INVENTORY, _profile(drops), allowed_drop=0.01) is None
    assert mixed_plan(space, INVENTORY, _profile({}), allowed_drop=0.01) is None  # nothing measured
    unmeasured = {**_row("c1", None, None), "status": "not measured"}
    assert mixed_plan(space, INVENTORY, {"rows": [unmeasured], "baseline": BASELINE}, 0.01) is None
