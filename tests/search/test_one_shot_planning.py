"""Planned starts on a real (tiny) hands-off-style run (digits CNN of width 8, ONNX Runtime, SQLite): the
mixed-precision one-shot plan comes right after int8 everywhere, a fine-tuned plan that would repeat a
post-training one is merged into it, and the profile's one-unit rows skip bias correction."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import yaml
from conftest import ROOT

import autocompress.backends.bias_correction as bc
import autocompress.backends.ort_quantize as oq
from autocompress.config import load_config
from autocompress.search import open_run
from autocompress.search.latency_profile import measure_profile
from autocompress.search.one_shot import STATIC
from autocompress.search.planned_starts import make_plans, plan_structure
from autocompress.search.planner import Planned, merge_same_structure


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("planning")
    study = {
        "name": "tiny",
        "task": {"name": "digits", "options": {"width": 8, "teacher_epochs": 1}},
        "space": {"file": str(ROOT / "autocompress/search_spaces/default.yaml")},
        # what a hands-off study resolves to: post-training first, fine-tuned only when it misses
        "finetune": {"epochs": 1, "threads": 1, "when": "missed_budget"},
        "backend": {"options": {"timing": {"warmup_s": 0.02, "min_s": 0.05, "max_s": 0.2}}},
        "budgets": {"max_metric_drop": 0.01},
        "trials": {"n": 3, "warm_start": []},
        "output": str(tmp / "run"),
    }
    (tmp / "tiny.yaml").write_text(yaml.safe_dump(study))
    with open_run(load_config(tmp / "tiny.yaml"), log=lambda s: None) as (ctx, st):
        yield ctx, st


def _int8(ctx) -> dict[str, dict]:
    return {i.name: {"bits": 8} for i in ctx.inventory}


def test_a_fine_tuned_plan_that_would_repeat_a_post_training_one_is_enqueued_once(run):
    ctx, _ = run
    pruned = {"features.10": {"sparsity": 0.5, "sparsity_kind": "structured"}}
    plans = [
        Planned(STATIC, _int8(ctx), {}, post_training=True),
        Planned("speed, drop <= 1x budget", _int8(ctx), {}),  # the planner's all-8-bit base alone
        Planned("pruned, post-training", pruned, {}, post_training=True),
        Planned("pruned, fine-tuned", pruned, {}),
    ]
    merged = merge_same_structure(plans, lambda p: plan_structure(ctx, p))
    # quantization alone is never fine-tuned under missed_budget: the second trial would repeat the first
    assert [p.name for p in merged] == [STATIC, "pruned, post-training", "pruned, fine-tuned"]
    assert merged[0].merged == ["speed, drop <= 1x budget"]
    always = ctx.config.finetune
    try:  # a study that fine-tunes every plan: the fine-tuned int8 plan is another experiment
        ctx.config.finetune = always.model_copy(update={"when": "always"})
        for p in plans:
            p.merged = []
        assert len(merge_same_structure(plans, lambda p: plan_structure(ctx, p))) == 4
    finally:
        ctx.config.finetune = always


def test_the_mixed_plan_is_enqueued_right_after_int8_everywhere(run):
    ctx, _ = run
    names = [i.name for i in ctx.inventory]
    baseline = {"metric": 0.9, "latency_ms": 1.0, "size_bytes": 10_000}
    whole = {"layer": "*", "setting": "all 8-bit", "status": "ok", "values": _int8(ctx), "metric_drop": 0.02}
    whole.update(speedup=2.0, size_ratio=3.0, latency_ms=0.5, size_bytes=3333)
    rows = [whole]
    for n, drop in zip(names, [0.015] + [0.0] * (len(names) - 1), strict=True):
        row = {"layer": n, "setting": "8-bit", "status": "ok", "values": {"bits": 8}, "metric_drop": drop}
        rows.append({**row, "speedup": 1.05, "size_ratio": 1.1, "latency_ms": 0.95, "size_bytes": 9000})
    plans = make_plans(ctx, {"rows": rows, "baseline": baseline}, 4)
    assert [p.name for p in plans[:2]] == [STATIC, "int8 static, 1 sensitive layer float"]
    assert plans[1].post_training and set(plans[1].layers) == set(names) - {names[0]}
    assert not any(p.post_training for p in plans[2:])
    # the planner's "all 8-bit" base alone merged into the post-training int8 plan (not a second trial)
    assert any(m.startswith("speed") for m in plans[0].merged)


def test_the_profile_bias_corrects_its_whole_model_rows_only(run, monkeypatch):
    ctx, _ = run
    calls: list[int] = []
    measured: list[int] = []
    real, real_measure = oq.correct_biases, bc._measure

    def counting(qmodel, float_path, feeds, nodes):
        calls.append(len(nodes))
        return real(qmodel, float_path, feeds, nodes)

    def measuring(qmodel, float_model, sources, feeds):
        measured.append(len(sources))
        return real_measure(qmodel, float_model, sources, feeds)

    monkeypatch.setattr(oq, "correct_biases", counting)
    monkeypatch.setattr(bc, "_measure", measuring)
    monkeypatch.setattr(bc, "_MEMO", OrderedDict())  # nothing corrected before in this process
    p = measure_profile(ctx, log=lambda s: None, use_cache=False)
    lowered = [r for r in p["rows"] if r["status"] == "ok" and r["setting"] in ("8-bit", "all 8-bit")]
    assert {r["layer"] for r in lowered} - {"*"} and len([r for r in lowered if r["layer"] == "*"]) == 1
    assert len(calls) == len(measured) == 1  # the all-8-bit row; no one-unit 8-bit row
    first_unit = next(i for i, r in enumerate(p["rows"]) if r["layer"] != "*")
    unit_settings = [r["setting"] for r in p["rows"][first_unit:]]
    n8 = unit_settings.count("8-bit")
    assert unit_settings[:n8] == ["8-bit"] * n8  # every unit's 8-bit row before any other setting
    # a trial's lowering of int8 layers is corrected
    from autocompress.pipeline import compress
    from autocompress.plan import LayerPlan, Plan

    plan = Plan(layers={k: LayerPlan(**v) for k, v in _int8(ctx).items()}, epochs=0, seed=ctx.config.seed)
    out = compress(ctx.task, ctx.teacher, plan, reduce_range=ctx.backend.reduce_range)
    art = ctx.lower(out.model, ctx.run_dir / "bc-trial", out.lowering)
    # ... with the biases the profile's all-8-bit row measured (the same graph: not measured again)
    assert len(calls) == 2 and len(measured) == 1
    row = next(r for r in p["rows"] if r["layer"] == "*" and r["setting"] == "all 8-bit")
    assert ctx.score(art) == pytest.approx(row["metric"])
    bc._MEMO.clear()  # another process: measured again, to the same biases
    again = ctx.lower(out.model, ctx.run_dir / "bc-trial-2", out.lowering)
    assert len(measured) == 2 and again.path.read_bytes() == art.path.read_bytes()
