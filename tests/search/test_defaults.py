"""Defaults chosen from the model when a study leaves them out: fine-tune length, layer groups."""

from __future__ import annotations

import optuna
import torch

from autocompress.config import StudyConfig
from autocompress.inventory import build_inventory
from autocompress.search.defaults import (
    TARGET_STEPS,
    apply_finetune_default,
    apply_space_default,
    auto_groups,
    role_of,
)
from autocompress.space import SearchSpace
from autocompress.tasks import Task
from autocompress.testing.models import PlainCNN, TinyTransformer


def _task(n: int) -> Task:
    x, y = torch.randn(n, 40), torch.randint(0, 10, (n,))
    return Task(name="t", model_fn=TinyTransformer, train=(x, y), test=(x[:8], y[:8]), teacher_epochs=0)


def test_epochs_from_the_data_size_when_the_study_sets_none():
    cfg = StudyConfig(name="s", task={"name": "t"})
    line = apply_finetune_default(cfg, _task(64 * 30))  # 30 steps per epoch at batch 64
    assert cfg.finetune.epochs == TARGET_STEPS // 30 and "5 epochs per trial (30 steps of batch 64" in line
    big = StudyConfig(name="s", task={"name": "t"})
    apply_finetune_default(big, _task(64 * 1000))
    assert big.finetune.epochs == 1  # never 0: one pass over a large split
    given = StudyConfig(name="s", task={"name": "t"}, finetune={"epochs": 2})
    assert apply_finetune_default(given, _task(64)) is None and given.finetune.epochs == 2


def test_deep_models_share_parameters_by_role_when_the_study_names_no_space():
    assert role_of("encoder.layers.3.linear1") == "encoder.layers.*.linear1"
    assert role_of("features.3") == "features.3"  # a trailing index is the layer itself, not a block
    deep = TinyTransformer(depth=6)
    inv = build_inventory(deep, deep.example_inputs())
    groups = auto_groups(inv)
    assert len(inv) == 38 and len(groups) == 8  # embed, head, q, k, v, o, mlp.0, mlp.2
    shallow = PlainCNN()
    assert auto_groups(build_inventory(shallow, shallow.example_inputs())) is None
    space = SearchSpace.from_dict({"bits": {"choices": [8, 32]}})
    line = apply_space_default(StudyConfig(name="s", task={"name": "t"}), space, inv)
    assert "38 layers share parameters by role in 8 groups" in line
    trial = optuna.create_study().ask()
    plan = space.suggest(trial, inv, epochs=0, lr=1e-3, seed=0)
    assert sorted(trial.params) == sorted(f"bits.{g}" for g in groups)
    assert len({plan.layers[f"layers.{i}.attn.q"].bits for i in range(6)}) == 1
    named = SearchSpace.from_dict({})
    assert apply_space_default(StudyConfig(name="s", task={"name": "t"}, space={}), named, inv) is None


def test_layers_of_one_name_pattern_share_parameters_only_within_one_kind_of_layer():
    """MobileNetV2's ``features.*.conv.*.0`` names both the 1x1 expansion convs and the depthwise 3x3
    convs (block 1 has no expansion): they are two groups, each of one kind of layer."""
    import re

    from autocompress.examples.mobilenet_v2 import MobileNetV2

    model = MobileNetV2(num_classes=10).eval()
    inv = build_inventory(model, (torch.randn(1, 3, 32, 32),))
    groups = auto_groups(inv)
    members = {g: [i for i in inv if re.fullmatch(p, i.name)] for g, p in groups.items()}
    assert sum(len(m) for m in members.values()) == len(inv) == 53  # every layer in exactly one group
    dw, pw = members["features.*.conv.*.0 (depthwise 3x3)"], members["features.*.conv.*.0 (Conv2d 1x1)"]
    assert len(dw) == 17 and all(i.groups == i.in_features > 1 for i in dw)
    assert len(pw) == 16 and all(i.groups == 1 and i.kernel == (1, 1) for i in pw)
    assert "features.*.conv.2" in groups and "features.1.conv.0.0" in {i.name for i in dw}
