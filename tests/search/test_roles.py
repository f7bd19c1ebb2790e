"""Structural roles: identical blocks are checked and profiled once per role (real compress, ONNX Runtime
lowering and timing on tiny models; no mocks)."""

from __future__ import annotations

import pytest
import torch
import yaml
from conftest import ROOT
from torch import nn

from autocompress.backends import OnnxRuntimeBackend
from autocompress.config import load_config
from autocompress.inventory import build_inventory
from autocompress.search import open_run
from autocompress.search.applicability import Applicability, PairCheck, check_applicability, summary_lines
from autocompress.search.latency_profile import measure_profile
from autocompress.search.roles import role_key, signature, structural_roles
from autocompress.space import SearchSpace
from autocompress.tasks import Task
from autocompress.testing.models import TinyTransformer

SPACE = ROOT / "autocompress/search_spaces/default.yaml"


def _encoder(depth: int) -> TinyTransformer:
    return TinyTransformer(length=40, patch=4, dim=16, depth=depth, heads=2)


def test_numbered_copies_of_a_block_share_roles_and_positions_inside_it_do_not():
    model = _encoder(4).eval()
    names = [i.name for i in build_inventory(model, (torch.randn(1, 40),))]
    roles = structural_roles(model, names, (torch.randn(1, 40),))
    assert len(names) == 26 and len(set(roles.values())) == 8  # embed, head, 6 layers of one block
    assert {roles[f"layers.{i}.attn.q"] for i in range(4)} == {roles["layers.0.attn.q"]}
    assert roles["layers.0.attn.q"] != roles["layers.0.attn.k"]  # same shapes, another place in the block
    assert roles["embed"] == "embed" and roles["head"] == "head"  # in no repeated block: their own
    alone = _encoder(1).eval()
    one = structural_roles(alone, [i.name for i in build_inventory(alone, (torch.randn(1, 40),))])
    assert all(role == name for name, role in one.items())  # a block without a copy: no shared role


class _Block(nn.Module):
    def __init__(self, stride: int = 1, width: int = 8):
        super().__init__()
        self.conv = nn.Conv1d(width, width, 3, stride=stride, padding=1)

    def forward(self, x):
        return self.conv(x).relu()


class _Last(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(x)


def test_a_different_attribute_shape_or_place_in_the_data_flow_is_another_role():
    # stride differs: same parameter shapes, another computation
    assert signature(_Block(1)) != signature(_Block(2)) and signature(_Block(1)) == signature(_Block(1))
    assert signature(_Block(width=8)) != signature(_Block(width=4))
    model = nn.Sequential(_Last(), _Last(), _Last()).eval()  # the last block's Linear returns the output
    x = (torch.randn(2, 8),)
    roles = structural_roles(model, ["0.fc", "1.fc", "2.fc"], x)
    assert roles["0.fc"] == roles["1.fc"] and roles["2.fc"] == "2.fc"
    assert role_key(roles, {"0.fc": {"bits": 8}}) == role_key(roles, {"1.fc": {"bits": 8}})
    assert role_key(roles, {"0.fc": {"bits": 8}}) != role_key(roles, {"1.fc": {"bits": 4}})


def _task(depth: int) -> tuple[Task, nn.Module]:
    torch.manual_seed(0)
    x = torch.randn(64, 40)
    with torch.no_grad():
        y = _encoder(depth).eval()(x).argmax(1)
    task = Task(
        name="enc",
        model_fn=lambda: _encoder(depth),
        train=(x[:48], y[:48]),
        test=(x[48:], y[48:]),
        teacher_epochs=0,
    )
    torch.manual_seed(1)
    return task, _encoder(depth).eval()


@pytest.fixture(scope="module")
def backend():
    be = OnnxRuntimeBackend()
    yield be
    be.close()


def test_applicability_costs_the_same_for_four_identical_layers_as_for_one(backend):
    results = {}
    for depth in (1, 4):
        task, teacher = _task(depth)
        inv = build_inventory(teacher, task.example_inputs())
        results[depth] = check_applicability(task, teacher, inv, SearchSpace.from_file(SPACE), backend)
    one, four = results[1], results[4]
    assert four.roles == one.roles == 8  # 26 layers against 8, in the same 8 roles
    assert (four.applies, four.lowerings) == (one.applies, one.lowerings)
    assert len(four.checks) > len(one.checks)  # every pair still has its verdict
    # the same verdict on every member of a role as on the one block of the 1-layer encoder
    seen = {(c.layer.replace("layers.0.", ""), c.technique): c.status for c in one.checks}
    for c in four.checks:
        key = (c.layer.split(".", 2)[-1] if c.layer.startswith("layers.") else c.layer, c.technique)
        assert c.status == seen[key], (c.layer, c.technique)


def test_shared_verdicts_equal_the_verdicts_checked_layer_by_layer(backend):
    task, teacher = _task(3)
    inv = build_inventory(teacher, task.example_inputs())
    shared = check_applicability(task, teacher, inv, SearchSpace.from_file(SPACE), backend)
    each = check_applicability(task, teacher, inv, SearchSpace.from_file(SPACE), backend, share_roles=False)
    assert [(c.layer, c.technique, c.status) for c in shared.checks] == [
        (c.layer, c.technique, c.status) for c in each.checks
    ]
    assert shared.domains == each.domains and shared.applies < each.applies
    assert any("the same structure" in c.reason for c in shared.excluded)


def test_the_log_names_a_role_once_with_the_layers_that_share_its_verdict():
    same = " (checked on enc.0.fc, the same structure)"
    checks = [PairCheck("enc.0.fc", "int4", "bits 4", "fails", "lowering", "no kernel", "bits.enc.*.fc")]
    checks += [
        PairCheck(
            f"enc.{i}.fc",
            "int4",
            "bits 4",
            "fails",
            "lowering",
            "no kernel" + same,
            "bits.enc.*.fc",
            "enc.0.fc",
        )
        for i in range(1, 12)
    ]
    checks.append(PairCheck("head", "int4", "bits 4", "no effect", "", "too small", "bits.head"))
    checks.append(PairCheck("enc.0.fc", "low rank", "ratio 0.1", "ok"))
    lines = summary_lines(Applicability(checks, roles=2))
    assert lines[0].endswith("13 excluded:") and len(lines) == 3
    assert lines[1] == (
        "  enc.0.fc: int4 at bits 4 fails (lowering): no kernel [bits.enc.*.fc]; "
        "the same for 11 more of its structure (enc.1.fc, enc.2.fc and 9 more)"
    )
    assert lines[2] == "  head: int4 at bits 4 no effect: too small [bits.head]"


def _study(tmp_path, depth: int) -> dict:
    return {
        "name": f"enc{depth}",
        "task": {
            "name": "mnist1d_transformer",
            "options": {"dim": 16, "depth": depth, "heads": 2, "teacher_epochs": 1, "num_samples": 400},
        },
        # one profiled setting of each kind (int8 static and dynamic, channels removed, a factorization):
        # the profile's cost is its lowerings, (roles) x (settings), measured twice here
        "space": {
            "file": str(SPACE),
            "overrides": {
                "bits": {"choices": [8, 32]},
                "sparsity": {"choices": [0.0, 0.5]},
                "rank_ratio": {"choices": [0.5, 1.0]},
            },
        },
        "finetune": {"epochs": 1, "threads": 1},
        # timed in this process (no timing worker): the rows' latencies are compared only with their copies
        "backend": {"options": {"timing": {"warmup_s": 0.02, "min_s": 0.05, "max_s": 0.2}, "isolate": False}},
        "budgets": {"max_metric_drop": 0.05},
        "sampler": {"name": "random"},
        "trials": {"n": 1, "warm_start": []},
        "output": str(tmp_path / f"run{depth}"),
    }


def test_the_profile_lowers_once_per_role_and_copies_the_row_to_the_other_members(tmp_path):
    profiles = {}
    for depth in (1, 3):
        (tmp_path / f"s{depth}.yaml").write_text(yaml.safe_dump(_study(tmp_path, depth)))
        with open_run(load_config(tmp_path / f"s{depth}.yaml"), log=lambda s: None) as (ctx, _):
            profiles[depth] = measure_profile(ctx, log=lambda s: None, use_cache=False)
    one, three = profiles[1], profiles[3]
    settings = {r["setting"] for r in three["rows"]}
    assert {"8-bit", "8-bit dynamic", "structured 0.5", "rank 0.5"} <= settings, settings
    assert three["lowerings"] == one["lowerings"] and three["roles"] == one["roles"]
    assert len(three["rows"]) > len(one["rows"]) and three["shared"] == len(three["rows"]) - len(one["rows"])
    first = {(r["layer"], r["setting"]): r for r in three["rows"]}
    for r in three["rows"]:
        if "role_of" not in r:
            continue
        assert r["role_of"].startswith("layers.0.") and r["layer"].startswith(("layers.1.", "layers.2."))
        measured = first[(r["role_of"], r["setting"])]
        assert r["status"] == measured["status"] and r["speedup"] == measured["speedup"]
        assert r["size_bytes"] == measured["size_bytes"] and r["values"] == measured["values"]
