"""Applicability and coverage, checked on the reference models themselves (real compress, forward and
ONNX Runtime lowering; no mocks)."""

from __future__ import annotations

import json

import optuna
import pytest
import torch
import yaml
from conftest import ROOT
from reliability_helpers import NO_TIMING_WORKER, QUICK_TIMING
from torch import nn

from autocompress.backends import OnnxRuntimeBackend
from autocompress.config import load_config
from autocompress.inventory import build_inventory
from autocompress.pipeline import compress
from autocompress.plan import LayerPlan, Plan
from autocompress.report_html import write_html
from autocompress.search.applicability import Applicability, check_applicability
from autocompress.search.coverage import coverage
from autocompress.search.runner import run_study
from autocompress.space import SearchSpace
from autocompress.tasks import Task
from autocompress.tasks.data import deployable
from autocompress.testing import REFERENCE_MODELS

SPACE = ROOT / "autocompress/search_spaces/default.yaml"


def _task(name: str, cls=None) -> Task:
    cls = cls or REFERENCE_MODELS[name]
    torch.manual_seed(0)
    x = cls.example_inputs(128)[0]
    with torch.no_grad():
        y = cls().eval()(x).argmax(1)
    return Task(name=name, model_fn=cls, train=(x[:96], y[:96]), test=(x[96:], y[96:]), teacher_epochs=0)


@pytest.fixture(scope="module")
def backend():
    be = OnnxRuntimeBackend()
    yield be
    be.close()


_CACHE: dict[str, tuple] = {}


def _checked(name: str, backend):
    """(task, teacher, inventory, narrowed space, result) of the default space on a reference model."""
    if name not in _CACHE:
        task = _task(name)
        torch.manual_seed(1)
        teacher = task.model_fn().eval()
        space = SearchSpace.from_file(SPACE)
        inv = build_inventory(teacher, task.example_inputs())
        result = check_applicability(task, teacher, inv, space, backend)
        space.narrow(result.domains)
        _CACHE[name] = (task, teacher, inv, space, result)
    return _CACHE[name]


def _excluded(result: Applicability) -> dict[tuple[str, str], str]:
    return {(c.layer, c.technique): c.status for c in result.excluded}


# (layer, technique) -> status of every pair removed from the default space, per reference model
EXPECTED = {
    "plain_cnn": {("classifier", "structured pruning"): "no effect"},
    "resnet": {("fc", "structured pruning"): "no effect"},
    "mobilenet": {
        ("blocks.0.dw", "low rank (ratio)"): "no effect",
        ("blocks.1.dw", "low rank (ratio)"): "no effect",
        ("fc", "structured pruning"): "no effect",
    },
    "transformer": {
        **{
            (f"layers.{i}.{p}", "structured pruning"): "fails"
            for i in range(2)
            for p in ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.2")
        },
        ("embed", "structured pruning"): "fails",
        ("head", "structured pruning"): "no effect",
    },
    "torch_transformer": {
        **{
            (f"encoder.layers.{i}.{p}", "low rank (ratio)"): "fails"
            for i in range(2)
            for p in ("self_attn.out_proj", "linear1", "linear2")
        },
        **{(f"encoder.layers.{i}.self_attn.out_proj", "structured pruning"): "no effect" for i in range(2)},
        ("head", "structured pruning"): "no effect",
    },
    "lstm": {("head", "structured pruning"): "no effect"},
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_exclusions_of_each_reference_model(name, backend):
    task, teacher, inv, space, result = _checked(name, backend)
    assert _excluded(result) == EXPECTED[name]
    # every allowed pair was checked: 2 bit widths, rank, structured and unstructured per layer; dynamic
    # int8 on each Linear layer (a conv's int8 is static); head pruning at 0.75 and 0.5 and layer dropping
    # on each attention output projection
    attention = [i for i in inv if i.name.endswith("self_attn.out_proj")]
    linear = [i for i in inv if i.kind == "Linear"]
    assert len(result.checks) == 5 * len(inv) + len(linear) + 3 * len(attention)
    assert {c.layer for c in result.checks if c.technique == "dynamic int8"} == {i.name for i in linear}
    assert all(
        c.status == "ok"
        for c in result.checks
        if c.technique in ("head pruning", "layer dropping", "dynamic int8")
    )
    lowered = {c.technique for c in result.checks if c.status == "ok"} - {
        "unstructured sparsity",
        "2:4 sparsity",
    }
    assert result.lowerings >= len(lowered)  # one lowering per technique kind at least
    for c in result.excluded:
        assert c.reason and c.removed
        group = c.layer
        if c.technique.startswith("low rank"):
            assert result.domains[f"rank.{group}"] == {"fixed": 1.0}
            assert space._layer_params(c.layer)["rank_ratio"].fixed == 1.0
        else:
            assert result.domains[f"sparsity_kind.{group}"] == {"fixed": "unstructured"}
            assert "structured" not in space._layer_params(c.layer)["sparsity_kind"].values()
    # layers nothing was excluded from keep the whole default domain
    kept = {i.name for i in inv} - {c.layer for c in result.excluded}
    for layer in kept:
        p = space._layer_params(layer)
        assert p["rank_ratio"].low == 0.1 and set(p["sparsity_kind"].values()) == {
            "unstructured",
            "structured",
        }


def test_reasons_name_the_cause(backend):
    result = _checked("torch_transformer", backend)[4]
    by = {(c.layer, c.technique): c for c in result.checks}
    out_proj = by[("encoder.layers.0.self_attn.out_proj", "low rank (ratio)")]
    assert out_proj.stage == "forward"
    assert "nn.MultiheadAttention reads out_proj.weight directly" in out_proj.reason
    assert "parametrize" in out_proj.reason and "no saving" in out_proj.reason
    assert (
        "TransformerEncoderLayer reads linear1.weight"
        in by[("encoder.layers.1.linear1", "low rank (ratio)")].reason
    )
    assert by[("encoder.layers.0.linear1", "int8")].status == "ok"  # quantization stays
    dw = _checked("mobilenet", backend)[4]
    assert "depthwise" in next(c.reason for c in dw.excluded if c.layer == "blocks.0.dw")
    tiny = _checked("transformer", backend)[4]
    assert "broke the model's forward pass" in next(
        c.reason for c in tiny.excluded if c.layer == "layers.0.attn.q"
    )


def _harshest(space: SearchSpace, inv) -> Plan:
    """Every layer at the harshest values left in its (narrowed) domains."""
    layers = {}
    for info in inv:
        p = space._layer_params(info.name)
        kinds = [str(v) for v in p["sparsity_kind"].values()]
        layers[info.name] = LayerPlan(
            bits=min(int(b) for b in p["bits"].values()),
            sparsity=max(float(v) for v in p["sparsity"].values()),
            sparsity_kind="structured" if "structured" in kinds else kinds[0],
            rank_ratio=min(float(v) for v in p["rank_ratio"].values()),
        )
    return Plan(layers=layers, epochs=0)


@pytest.mark.parametrize("name", ["torch_transformer", "mobilenet"])
def test_the_harshest_remaining_plan_compresses_runs_and_lowers(name, backend, tmp_path):
    task, teacher, inv, space, _ = _checked(name, backend)
    plan = _harshest(space, inv)
    if name == "torch_transformer":
        assert plan.layers["encoder.layers.0.self_attn.out_proj"].rank_ratio == 1.0
        assert plan.layers["embed"].rank_ratio == 0.1 and plan.layers["embed"].sparsity_kind == "structured"
    out = compress(task, teacher, plan, round_to=backend.preferred_channel_multiple)  # as a trial does
    with torch.no_grad():
        assert deployable(out.model, task.io)(*task.example_inputs()).shape == (1, 10)
    art = backend.lower(
        deployable(out.model, task.io),
        task.example_inputs(),
        out.lowering,
        tmp_path,
        calibration=task.calibration_inputs(),
        io=task.io,
    )
    assert art.path.exists() and art.size_bytes > 0


class WidthBound(nn.Module):
    """Two branches concatenated; the model refuses fewer than 32 features: either branch may lose
    channels on its own, not both."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 24), nn.Linear(8, 24)
        self.head = nn.Linear(48, 10)

    def forward(self, x):
        h = torch.relu(torch.cat([self.a(x), self.b(x)], 1))
        if h.shape[1] < 32:
            raise RuntimeError(f"at least 32 features needed, got {h.shape[1]}")
        return self.head(h)

    @staticmethod
    def example_inputs(batch: int = 2):
        return (torch.randn(batch, 8),)


def test_structured_pruning_that_breaks_only_jointly_is_excluded_from_the_later_layer(backend):
    task = _task("width", WidthBound)
    model = WidthBound().eval()
    space = SearchSpace.from_dict(
        {"sparsity": {"choices": [0.0, 0.6]}, "sparsity_kind": {"fixed": "structured"}}
    )
    inv = build_inventory(model, task.example_inputs())
    result = check_applicability(task, model, inv, space, backend)
    by = {c.layer: c for c in result.checks}
    assert by["a"].status == "ok"  # 24 -> 8 channels alone: 32 features, allowed
    assert by["b"].status == "fails" and by["b"].stage == "apply (jointly)"
    assert "works alone, fails together with a" in by["b"].reason and "got 16" in by["b"].reason
    assert by["head"].status == "no effect"
    assert result.domains == {"sparsity.b": {"fixed": 0.0}, "sparsity.head": {"fixed": 0.0}}
    space.narrow(result.domains)
    out = compress(task, model, _harshest(space, inv), round_to=backend.preferred_channel_multiple)
    assert out.model.a.out_features == 8 and out.model.b.out_features == 24


class GRUClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.gru = nn.GRU(16, 64, batch_first=True)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        out, _ = self.gru(self.embed(x))
        return self.head(out[:, -1])

    @staticmethod
    def example_inputs(batch: int = 2):
        return (torch.randint(0, 50, (batch, 12)),)


def test_coverage_of_recurrent_models(backend):
    task, teacher, inv, space, result = _checked("lstm", backend)
    cov = coverage(teacher, task, inv, space, result)
    assert cov["params_total"] == sum(p.numel() for p in teacher.parameters())
    assert cov["params_touched"] == sum(p.numel() for p in teacher.head.parameters())
    lstm = cov["untouched"][0]
    assert lstm["part"] == "lstm" and lstm["type"] == "LSTM" and "recurrent layer" in lstm["reason"]
    assert lstm["share"] == pytest.approx(1 - cov["params_share"]) and lstm["share"] > 0.9
    # multiply-accumulates at batch 1: the LSTM's 4 gates over 12 steps dwarf the head's
    steps, hidden, features = 12, 32, 8
    assert cov["macs_touched"] == hidden * 10
    assert cov["macs_total"] == 4 * hidden * (features + hidden) * steps + hidden * 10
    assert cov["macs_share"] < 0.01

    gru_task = _task("gru", GRUClassifier)
    gru = GRUClassifier().eval()
    gru_inv = build_inventory(gru, gru_task.example_inputs())
    assert [(i.name, i.kind) for i in gru_inv] == [("embed", "Embedding"), ("head", "Linear")]
    assert gru_inv[0].macs == 0 and (gru_inv[0].in_features, gru_inv[0].out_features) == (50, 16)
    gcov = coverage(gru, gru_task, gru_inv, SearchSpace.from_file(SPACE), None)
    reasons = {r["type"]: r for r in gcov["untouched"]}
    assert set(reasons) == {"GRU"}  # the embedding table's bits are searched
    assert reasons["GRU"]["share"] > 0.9 and "nn.GRU" in reasons["GRU"]["reason"]
    assert gcov["params_share"] == pytest.approx((650 + 800) / sum(p.numel() for p in gru.parameters()))
    # a backend that stores tables in float only: the table is fixed, untouched
    float_tables = SearchSpace.from_file(SPACE)
    float_tables.allowed_by_kind["bits"] = {"Embedding": (32,)}
    reasons = {r["type"]: r for r in coverage(gru, gru_task, gru_inv, float_tables, None)["untouched"]}
    assert set(reasons) == {"GRU", "Embedding"}
    assert reasons["Embedding"]["reason"] == "the space fixes this layer (float, dense, full rank)"


def test_coverage_names_attention_projections_and_excluded_layers(backend):
    task, teacher, inv, space, result = _checked("torch_transformer", backend)
    cov = coverage(teacher, task, inv, space, result)
    mha = next(r for r in cov["untouched"] if r["type"] == "MultiheadAttention")
    assert "in_proj_weight" in mha["reason"] and mha["params"] == 2 * (3 * 32 * 32 + 3 * 32)
    assert set(cov["layers_touched"]) == {i.name for i in inv}  # quantization still reaches every Linear
    # batch 1, 10 tokens of width 32: per layer, q/k/v projections + attention + out_proj + the MLP
    tokens, dim = 10, 32
    per_layer = (
        3 * tokens * dim * dim + 2 * tokens * tokens * dim + tokens * dim * dim + 2 * tokens * dim * 2 * dim
    )
    assert cov["macs_total"] == 2 * per_layer + tokens * 4 * dim + dim * 10
    untouched = 2 * (3 * tokens * dim * dim + 2 * tokens * tokens * dim)
    assert cov["macs_share"] == pytest.approx(1 - untouched / cov["macs_total"])
    # a space that offers only low rank: the layers it cannot factorize are untouched, with the reason
    only_rank = SearchSpace.from_dict({"rank_ratio": {"low": 0.2, "high": 1.0, "step": 0.1}})
    r2 = check_applicability(task, teacher, inv, only_rank, backend)
    only_rank.narrow(r2.domains)
    cov2 = coverage(teacher, task, inv, only_rank, r2)
    excluded = [r for r in cov2["untouched"] if r["reason"].startswith("every technique the space offers")]
    assert all("low rank (ratio)" in r["reason"] for r in excluded)
    assert sorted(m for r in excluded for m in r["modules"]) == sorted(
        f"encoder.layers.{i}.{p}" for i in range(2) for p in ("linear1", "linear2", "self_attn.out_proj")
    )
    assert set(cov2["layers_touched"]) == {"embed", "head"}


def _report_study(tmp_path, attrs: dict) -> optuna.Study:
    study = optuna.create_study(
        study_name="demo",
        storage=f"sqlite:///{tmp_path / 'study.db'}",
        directions=["maximize", "minimize", "minimize"],
    )
    for k, v in attrs.items():
        study.set_user_attr(k, v)
    return study


def test_report_shows_applicability_and_coverage_tables(backend, tmp_path):
    task, teacher, inv, space, result = _checked("torch_transformer", backend)
    cov = coverage(teacher, task, inv, space, result)
    study = _report_study(
        tmp_path, {"applicability": result.to_dict(), "coverage": json.loads(json.dumps(cov))}
    )
    html = write_html(study, tmp_path).read_text()
    assert "<h3>Applicability (checked before the first trial)</h3>" in html
    assert f"{len(result.checks)} (technique, layer) pairs checked" in html
    assert "nn.MultiheadAttention reads out_proj.weight directly" in html
    assert "rank.encoder.layers.0.self_attn.out_proj -&gt; fixed 1.0" in html
    assert "<h4>Coverage</h4>" in html and f"{cov['params_share']:.1%} of the model" in html
    assert (
        "in_proj_weight" in html and "<td>36.0%</td>" in html
    )  # MultiheadAttention's share, as a percentage
    (tmp_path / "old").mkdir()
    old = _report_study(tmp_path / "old", {})  # a study made before the check existed
    assert "not checked" in write_html(old, tmp_path / "old").read_text()


@pytest.mark.slow
def test_study_on_torch_transformer_narrows_before_the_first_trial_and_no_trial_fails(tmp_path):
    data = {
        "name": "mha",
        "task": {"name": None},
        "space": {"file": str(SPACE)},
        "finetune": {"epochs": 1},
        # latency is not what this test checks: short rounds, in this process
        "backend": {"options": {"timing": dict(QUICK_TIMING), **NO_TIMING_WORKER}},
        "sampler": {"name": "random"},
        "trials": {
            "n": 4,
            "warm_start": [{"bits": 8, "rank_ratio": 0.3, "sparsity": 0.5, "sparsity_kind": "structured"}],
        },
        "output": str(tmp_path / "run"),
    }
    (tmp_path / "mha.yaml").write_text(yaml.safe_dump(data))
    lines: list[str] = []
    summary = run_study(load_config(tmp_path / "mha.yaml"), task=_task("torch_transformer"), log=lines.append)
    first_trial = next(i for i, line in enumerate(lines) if "trial 0" in line)
    head = "\n".join(lines[:first_trial])
    assert (
        "applicability: 54 (technique, layer) pairs checked" in head
    )  # 46 + dynamic int8 per Linear and "9 excluded" in head
    assert "coverage: the search can change 62.5% of the model's parameters" in head
    study = summary.study
    assert study.user_attrs["narrowed_domains"]["rank.encoder.layers.0.self_attn.out_proj"] == {"fixed": 1.0}
    saved = json.loads((tmp_path / "run" / "applicability.json").read_text())
    assert saved["domains"] == study.user_attrs["applicability"]["domains"]
    assert json.loads((tmp_path / "run" / "coverage.json").read_text())["params_touched"] == 10_986
    states = [t.state for t in study.get_trials()]
    assert states == [optuna.trial.TrialState.COMPLETE] * 4, [
        t.user_attrs.get("fail_reason") for t in study.get_trials()
    ]
    for t in study.get_trials():
        layers = t.user_attrs["plan"]["layers"]
        assert layers["encoder.layers.0.self_attn.out_proj"]["rank_ratio"] == 1.0
        assert layers["head"]["sparsity_kind"] == "unstructured"
    assert "rank.encoder.layers.1.linear2" not in study.get_trials()[0].params  # fixed: not asked


def test_grouped_layers_lose_a_choice_together_and_the_space_still_suggests(backend):
    task = _task("mobilenet")
    teacher = task.model_fn().eval()
    inv = build_inventory(teacher, task.example_inputs())
    space = SearchSpace.from_dict(
        {
            "rank_ratio": {"low": 0.2, "high": 1.0, "step": 0.2},
            "groups": {"depthwise": r"blocks\.\d\.dw", "rest": ".*"},
        }
    )
    result = check_applicability(task, teacher, inv, space, backend)
    assert result.domains == {"rank.depthwise": {"fixed": 1.0}}
    assert {c.layer for c in result.excluded} == {"blocks.0.dw", "blocks.1.dw"}
    assert all(c.removed == "rank.depthwise -> fixed 1.0" for c in result.excluded)
    space.narrow(result.domains)
    study = optuna.create_study(directions=["maximize"], sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(4):
        trial = study.ask()
        plan = space.suggest(trial, inv, epochs=0, lr=1e-3, seed=0)
        assert plan.layers["blocks.0.dw"].rank_ratio == plan.layers["blocks.1.dw"].rank_ratio == 1.0
        assert "rank.depthwise" not in trial.params and "rank.rest" in trial.params
        study.tell(trial, 0.0)
