"""Embedding tables as compressible layers: in the inventory, a per-layer bits choice in the space (the
other techniques' fields are not asked there), fake-quantized per row in the pipeline, accepted by the
applicability check, counted by the size floor (real compress and ONNX Runtime lowering)."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import torch
from torch import nn

from autocompress.backends import OnnxRuntimeBackend
from autocompress.backends.torch_backend import TorchBackend
from autocompress.inventory import build_inventory, compressible_layers, layer_kind, matmul_layers
from autocompress.pipeline import compress
from autocompress.plan import LayerPlan, Plan
from autocompress.search.applicability import check_applicability
from autocompress.search.coverage import coverage
from autocompress.search.latency_profile import layer_settings
from autocompress.search.preflight import min_artifact_bytes
from autocompress.space import SearchSpace
from autocompress.testing.technique_suite import reference_task

ROOT = Path(__file__).resolve().parents[2]
SPACE = ROOT / "autocompress/search_spaces/default.yaml"


class TextClassifier(nn.Module):
    """Token ids -> embedding table -> Linear -> mean -> logits; a bag table and a max_norm table beside."""

    def __init__(self, vocab: int = 200, dim: int = 32):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.normed = nn.Embedding(vocab, 8, max_norm=1.0)  # renormalizes itself in its forward: not a layer
        self.bag = nn.EmbeddingBag(vocab, 8)
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim + 16, 10)

    def forward(self, ids):
        h = torch.relu(self.proj(self.emb(ids))).mean(1)
        return self.head(torch.cat([h, self.normed(ids).mean(1), self.bag(ids)], dim=1))

    @staticmethod
    def example_inputs(batch: int = 2) -> tuple[torch.Tensor, ...]:
        return (torch.randint(0, 200, (batch, 10)),)


@pytest.fixture(scope="module")
def case():
    task = reference_task(TextClassifier, samples=64)
    teacher = task.model_fn().eval()
    return task, teacher, build_inventory(teacher, task.example_inputs())


def test_inventory_lists_embedding_tables_as_lookups(case):
    _, teacher, inv = case
    assert [(i.name, i.kind) for i in inv] == [("emb", "Embedding"), ("proj", "Linear"), ("head", "Linear")]
    emb = inv[0]
    assert (emb.in_features, emb.out_features, emb.params, emb.macs) == (200, 32, 6400, 0)
    assert [n for n, _ in compressible_layers(teacher)] == ["emb", "proj", "head"]
    assert [n for n, _ in matmul_layers(teacher)] == ["proj", "head"]
    assert layer_kind(teacher.normed) is None and layer_kind(teacher.bag) is None


def test_space_asks_a_table_for_its_bits_only(case):
    _, _, inv = case
    space = SearchSpace.from_file(SPACE)
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    plan = space.suggest(trial, inv, epochs=1, lr=1e-3, seed=0)
    emb_params = sorted(k for k in trial.params if k.endswith(".emb"))
    proj_params = {k.rsplit(".", 1)[0] for k in trial.params if k.endswith(".proj")}
    assert emb_params[0] == "bits.emb" and {"sparsity", "sparsity_kind", "rank"} <= proj_params
    assert set(emb_params) <= {"bits.emb", "qscheme.emb", "qgranularity.emb"}
    lp = plan.layer("emb")
    assert (lp.sparsity, lp.rank_ratio, lp.quant_mode) == (0.0, 1.0, "static")
    # one parameter for the whole model: the table shares bits.all with the matmuls, nothing else
    space.model.groups = "global"
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1)).ask()
    plan = space.suggest(trial, inv, epochs=1, lr=1e-3, seed=0)
    assert plan.layer("emb").bits == plan.layer("proj").bits == trial.params["bits.all"]
    assert plan.layer("emb").rank_ratio == 1.0 and plan.layer("emb").sparsity == 0.0
    # warm starts: a uniform plan gives the table its bits, not the matmuls' rank
    space.model.groups = "layer"
    params = space.params_for(inv, bits=8, rank_ratio=0.5)
    assert params["bits.emb"] == 8 and "rank.emb" not in params and params["rank.proj"] == 0.5


def test_a_backend_that_stores_tables_in_float_is_not_asked(case):
    _, _, inv = case
    space = SearchSpace.from_file(SPACE)
    space.allowed_by_kind["bits"] = dict(TorchBackend.bits_by_kind)
    assert TorchBackend.bits_by_kind == {"Embedding": (32,)}
    assert OnnxRuntimeBackend.bits_by_kind == {"Embedding": OnnxRuntimeBackend.stored_bits}
    trial = optuna.create_study().ask()
    plan = space.suggest(trial, inv, epochs=1, lr=1e-3, seed=0)
    assert not [k for k in trial.params if k.endswith(".emb")] and plan.layer("emb").bits == 32
    assert "bits.emb" not in space.params_for(inv, bits=8)
    assert space.layer_params(inv[0])["bits"].fixed == 32
    assert layer_settings(space, inv[0]) == []  # nothing to profile on it


def test_pipeline_fake_quantizes_tables_per_row_and_notes_fields_that_do_not_apply(case):
    task, teacher, _ = case
    plan = Plan(
        layers={
            "emb": LayerPlan(bits=8, rank_ratio=0.5, sparsity=0.5, quant_mode="dynamic"),
            "proj": LayerPlan(bits=8),
        },
        epochs=0,
    )
    out = compress(task, teacher, plan, reduce_range=True)
    assert out.notes["emb"] == (
        "sparsity, rank_ratio, quant_mode not applied: Embedding layers take bits, quant_scheme, "
        "quant_granularity only"
    )
    assert isinstance(out.model.emb, nn.Embedding) and out.model.emb.weight.shape == (200, 32)
    lay = out.lowering.layers["emb"]
    assert (lay.bits, lay.mode, lay.scheme, lay.granularity) == (8, "static", "symmetric", "channel")
    w, q, scale = teacher.emb.weight.detach(), lay.weight.q, lay.weight.scale
    assert scale.shape == (200,) and abs(q).max() == 127  # per row, the full grid despite reduce_range
    assert out.lowering.layers["proj"].weight.q.max() <= 63  # the matmul keeps the 7-bit grid
    torch.testing.assert_close(scale, (w.abs().amax(1) / 127).numpy(), rtol=1e-6, atol=0)
    assert (abs(out.model.emb.weight.detach() - w) <= torch.from_numpy(scale)[:, None] / 2 + 1e-7).all()
    # the other tables are untouched, the max_norm one and the bag alike
    assert "normed" not in out.lowering.layers and "bag" not in out.lowering.layers


def test_applicability_accepts_table_bits_and_coverage_counts_the_table(case):
    task, teacher, inv = case
    space = SearchSpace.from_file(SPACE)
    space.allowed_by_kind["bits"] = dict(OnnxRuntimeBackend.bits_by_kind)
    backend = OnnxRuntimeBackend()
    try:
        result = check_applicability(task, teacher, inv, space, backend)
    finally:
        backend.close()
    on_table = {(c.technique, c.status) for c in result.checks if c.layer == "emb"}
    assert on_table == {("int4", "ok"), ("int8", "ok")}  # bits only: no sparsity, low rank, structured
    cov = coverage(teacher, task, inv, space, result)
    assert "emb" in cov["layers_touched"]
    untouched = {r["part"]: r["reason"] for r in cov["untouched"]}
    assert set(untouched) == {"normed", "bag"}
    assert "max_norm" in untouched["normed"] and "embedding bag" in untouched["bag"]


def test_size_floor_holds_the_table_at_its_lowest_bits(case):
    _, _, inv = case
    space = SearchSpace.from_dict({"bits": {"choices": [4, 32]}, "rank_ratio": {"low": 0.1, "high": 1.0}})
    floor = min_artifact_bytes(space, inv)
    # the table: 200 x 32 at 4 bits whatever the rank space says; the matmuls may be factorized
    assert floor >= 200 * 32 // 2
    float_tables = SearchSpace.from_dict({"bits": {"choices": [4, 32]}})
    float_tables.allowed_by_kind["bits"] = {"Embedding": (32,)}
    assert (
        min_artifact_bytes(float_tables, inv)
        - min_artifact_bytes(SearchSpace.from_dict({"bits": {"choices": [4, 32]}}), inv)
        == 200 * 32 * 4 - 200 * 32 // 2
    )
