"""Sensitivity analysis: cached, and its ranking agrees with a direct measurement."""

from __future__ import annotations

import copy

import pytest
from conftest import ROOT
from torch.nn.utils import prune

from autocompress.config import load_config
from autocompress.inspection import analyze, gentle_plan, ranking, table
from autocompress.search import open_run
from autocompress.techniques import fold_batchnorm
from autocompress.techniques._modules import get_module

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The quickstart study with a smaller model: 16 wide, its teacher trained here for 8 epochs (width 64
    and 20 epochs made the teacher and the analysis's 30 lowered settings most of this file's time; this
    teacher scores ~0.975, 8-bit costs it nothing and the sensitivity ranks layers apart by ~0.3)."""
    tmp = tmp_path_factory.mktemp("sens")
    overrides = {"output": str(tmp / "run"), "trials.warm_start": [], "task.options.width": 16}
    overrides["task.options.teacher_epochs"] = 8
    cfg = load_config(ROOT / "autocompress/studies/quickstart.yaml", overrides)
    with open_run(cfg, log=lambda s: None) as (ctx, st):
        yield ctx, st, cfg


def _direct_drop(ctx, layer: str, sparsity: float) -> float:
    """PyTorch's own L1 pruning of one layer of the folded teacher, lowered and evaluated."""
    model, _ = fold_batchnorm(copy.deepcopy(ctx.teacher))
    prune.l1_unstructured(get_module(model, layer), "weight", amount=sparsity)
    prune.remove(get_module(model, layer), "weight")
    art = ctx.backend.lower(model, ctx.task.example_inputs(), {}, ctx.run_dir / "direct" / layer)
    x, y = ctx.task.test
    return ctx.baseline["metric"] - ctx.backend.evaluate(art, x.numpy(), y.numpy(), ctx.task.score)


def test_sensitivity_ranking_agrees_with_direct_measurement(run):
    ctx, _, _ = run
    df = analyze(ctx, log=lambda s: None, use_cache=False)
    assert len(df) == len(ctx.inventory) * 6
    t = table(df)
    assert list(t.index) == [i.name for i in ctx.inventory]
    assert (t["8-bit"].abs() <= 0.02).all()  # 8-bit alone costs (almost) nothing
    order = ranking(df)
    most, least = order.index[0], order.index[-1]
    assert order.iloc[0] > order.iloc[-1]
    direct_most = _direct_drop(ctx, most, 0.8)
    direct_least = _direct_drop(ctx, least, 0.8)
    assert direct_most > direct_least, (most, direct_most, least, direct_least)
    # the same table comes back from the cache
    cached = analyze(ctx, log=lambda s: None)
    assert cached.metric_drop.tolist() == pytest.approx(df.metric_drop.tolist())


def test_gentle_plan_becomes_a_valid_warm_start(run):
    ctx, _, _ = run
    df = analyze(ctx, log=lambda s: None)
    gentle = gentle_plan(df, 0.01)
    for layer, dims in gentle.items():
        rows = df[(df.layer == layer)]
        for dim, value in dims.items():
            chosen = rows[(rows.dimension == dim) & (rows.value == value)]
            assert float(chosen.metric_drop.iloc[0]) <= 0.01
    params = ctx.space.params_from_layers(ctx.inventory, gentle)
    assert all(k.split(".", 1)[0] in {"bits", "sparsity", "rank"} for k in params)
    assert all(params[f"bits.{layer}"] == dims["bits"] for layer, dims in gentle.items() if "bits" in dims)
