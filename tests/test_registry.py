"""A technique registered from a test file alone (no package file edited) reaches every layer that iterates
the registry: the search space (an Optuna parameter), the plan JSON, warm starts, the pipeline, the report."""

from __future__ import annotations

import optuna
import pytest
import torch
from torch import nn

from autocompress import Task
from autocompress.config import WarmStart, load_config
from autocompress.errors import ConfigError
from autocompress.inventory import build_inventory
from autocompress.pipeline import compress
from autocompress.plan import LayerPlan, Plan
from autocompress.registry import TECHNIQUES, Dim, TechniqueSpec
from autocompress.report import layer_table
from autocompress.space import SearchSpace


def _scale_weights(build) -> None:
    """The toy technique's step: multiply the weight of each layer by its planned factor."""
    for name, layer in build.layers().items():
        factor = build.plan.layer(layer).scale
        if factor != 1.0:
            with torch.no_grad():
                dict(build.student.named_modules())[name].weight.mul_(factor)


SCALE = TechniqueSpec(
    "toy_scale",
    dims=(Dim("scale", 1.0, short="toyscale", cast=float, choices=(1.0, 0.5), order=2000),),
    steps=((5, _scale_weights),),  # after folding BN, before every other technique
)


@pytest.fixture
def scale_technique():
    TECHNIQUES.add(SCALE.name, SCALE)
    try:
        yield SCALE
    finally:
        TECHNIQUES.remove(SCALE.name)
    assert "scale" not in {d.name for d in TECHNIQUES.dims()}


def _task() -> Task:
    torch.manual_seed(0)
    x, y = torch.rand(32, 4), torch.randint(0, 3, (32,))
    return Task(
        name="toy",
        model_fn=lambda: nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)),
        train=(x, y),
        test=(x, y),
    )


def test_the_registered_field_is_an_optuna_parameter_and_a_plan_field(scale_technique):
    task = _task()
    inventory = build_inventory(task.model_fn().eval(), task.example_inputs())
    space = SearchSpace.from_dict(
        {"scale": {"choices": [1.0, 0.5]}, "layers": {"0": {"scale": {"fixed": 1.0}}}}
    )
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trial = study.ask()
    plan = space.suggest(trial, inventory, epochs=0, lr=1e-3, seed=0)
    assert set(trial.params) == {"toyscale.2"}  # layer "0" is fixed by its override: not asked
    assert plan.layer("2").scale == trial.params["toyscale.2"] and plan.layer("0").scale == 1.0
    # plan JSON round trip; a plan written before the technique existed still loads (its default)
    again = Plan.from_json(plan.to_json())
    assert again == plan and '"scale"' in plan.to_json()
    old = plan.to_dict()
    del old["layers"]["2"]["scale"]
    assert Plan.from_dict(old).layer("2").scale == 1.0
    with pytest.raises(ConfigError, match=r"layers.2.scale: scale 0.3 is not one of \[1.0, 0.5\]"):
        Plan(layers={"2": LayerPlan(scale=0.3)})
    with pytest.raises(ConfigError, match=r"scale: 0.3 is not one of \[1.0, 0.5\]"):
        SearchSpace.from_dict({"scale": {"choices": [0.3]}})


def test_a_warm_start_names_the_field_and_a_wrong_value_is_refused(scale_technique, tmp_path):
    task = _task()
    inventory = build_inventory(task.model_fn().eval(), task.example_inputs())
    space = SearchSpace.from_dict({"scale": {"choices": [1.0, 0.5]}})
    ws = WarmStart(bits=32, scale=0.5)
    assert space.params_for(inventory, **ws.layer_values()) == {"toyscale.0": 0.5, "toyscale.2": 0.5}
    study = tmp_path / "study.yaml"
    study.write_text("name: toy\ntask: {name: digits}\ntrials:\n  warm_start:\n    - {bits: 8, scale: 0.5}\n")
    assert load_config(study).trials.warm_start[0].layer_values()["scale"] == 0.5
    study.write_text("name: toy\ntask: {name: digits}\ntrials:\n  warm_start:\n    - {bits: 8, scale: 0.3}\n")
    with pytest.raises(ConfigError, match=r"trials.warm_start.0: scale: 0.3 is not one of \[1.0, 0.5\]"):
        load_config(study)


def test_the_pipeline_applies_it_and_the_report_shows_it(scale_technique):
    task = _task()
    teacher = task.model_fn().eval()
    plan = Plan(layers={"0": LayerPlan(), "2": LayerPlan(scale=0.5)}, epochs=0)
    out = compress(task, teacher, plan)
    torch.testing.assert_close(out.model[2].weight, 0.5 * teacher[2].weight)
    torch.testing.assert_close(out.model[0].weight, teacher[0].weight)  # its factor is the default 1.0
    study = optuna.create_study(directions=["maximize", "minimize"])
    notes = {"2": "scaled"}
    study.add_trial(
        optuna.trial.create_trial(values=[0.9, 1.0], user_attrs={"plan": plan.to_dict(), "notes": notes})
    )
    table = layer_table(study)
    assert "scale" in table.columns
    assert (
        table.set_index("layer").loc["2", "scale"] == 0.5
        and table.set_index("layer").loc["0", "scale"] == 1.0
    )


def test_a_field_of_another_technique_cannot_be_registered_twice(scale_technique):
    with pytest.raises(ValueError, match="field 'bits' belongs to 'quantize'"):
        TECHNIQUES.add("clash", TechniqueSpec("clash", dims=(Dim("bits", 8),)))
    assert "clash" not in TECHNIQUES
