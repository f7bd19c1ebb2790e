"""Techniques in depth: iterative structured pruning on the sparsity schedule, CP decomposition of
convs, and sensitivity-based narrowing of the per-layer search domains."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import optuna
import pytest
import torch
import yaml
from conftest import ROOT
from torch import nn

from autocompress.backends import OnnxRuntimeBackend
from autocompress.config import load_config
from autocompress.errors import TechniqueError
from autocompress.inventory import compressible_layers
from autocompress.pipeline import compress
from autocompress.plan import LayerPlan, Plan, Schedule
from autocompress.search import open_run
from autocompress.search.runner import run_study
from autocompress.space import SearchSpace
from autocompress.tasks import Task
from autocompress.techniques import (
    ChannelSchedule,
    cp_macs,
    factorize_cp,
    fold_batchnorm,
    plan_factorization,
    prune_channels,
    sparsity_at,
    target_width,
)
from autocompress.testing import REFERENCE_MODELS


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one thread is faster, and it does not oversubscribe a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _task(name: str, n: int = 96) -> Task:
    cls = REFERENCE_MODELS[name]
    torch.manual_seed(0)
    x = cls.example_inputs(n + 32)[0]
    with torch.no_grad():
        y = cls().eval()(x).argmax(1)
    return Task(name=name, model_fn=cls, train=(x[:n], y[:n]), test=(x[n:], y[n:]), teacher_epochs=0)


def _widths(model: nn.Module) -> dict[str, int]:
    return {n: m.weight.shape[0] for n, m in compressible_layers(model)}


# --- A. iterative structured pruning --------------------------------------------------------------


def test_target_width_follows_torch_pruning_rounding():
    assert target_width(32, 0.3) == 22  # int(22.4)
    assert target_width(32, 0.3, 8) == 16
    assert target_width(16, 0.6, 8) == 8  # never below one multiple
    assert target_width(16, 0.0, 8) == 16 and target_width(12, 0.0, 8) == 12  # ratio 0: untouched
    with pytest.raises(TechniqueError, match=r"ratio 1.0 .* outside \[0, 1\)"):
        target_width(16, 1.0)


def test_channel_schedule_hits_the_schedule_at_chosen_steps():
    torch.manual_seed(0)
    model, _ = fold_batchnorm(REFERENCE_MODELS["plain_cnn"]().eval())
    x = REFERENCE_MODELS["plain_cnn"].example_inputs()
    final = {"features.0": 0.5, "features.3": 0.5, "classifier": 0.5}
    sched = ChannelSchedule(model, x, final, "linear", 0.2, 0.6, steps=4)
    assert sched.skipped == {"classifier"}  # produces the output: never pruned
    expected = {  # linear staircase of 4 steps between 0.2 and 0.6: 1/8, 2/8, 3/8, 4/8 of the channels
        0.0: (16, 32),
        0.2: (16, 32),
        0.3: (14, 28),
        0.39: (14, 28),
        0.4: (12, 24),
        0.5: (10, 20),
        0.6: (8, 16),
        1.0: (8, 16),
    }
    for progress, (w0, w3) in expected.items():
        sched.step(progress)
        got = _widths(model)
        assert (got["features.0"], got["features.3"]) == (w0, w3), progress
        assert got["classifier"] == 10
        r = sparsity_at("linear", 0.5, 0.2, 0.6, progress, 4)
        assert got["features.3"] == target_width(32, r)
    assert [p for p, _ in sched.history] == [0.3, 0.4, 0.5, 0.6]
    assert sched.changes == {"features.0": (16, 8), "features.3": (32, 16)}
    assert model(*x).shape == (2, 10) and torch.isfinite(model(*x)).all()


def test_channel_schedule_with_rounding_ends_at_the_one_shot_widths():
    torch.manual_seed(0)
    cls = REFERENCE_MODELS["resnet"]
    model, _ = fold_batchnorm(cls().eval())
    x = cls.example_inputs()
    final = {n: 0.5 for n, _ in compressible_layers(model)}
    one_shot = copy.deepcopy(model)
    prune_channels(one_shot, x, final, round_to=8)
    sched = ChannelSchedule(model, x, final, "cubic", 0.0, 1.0, round_to=8)
    for progress in (0.05, 0.1, 0.3, 0.5, 1.0):
        sched.step(progress)
        for name, w in sched.current().items():
            assert w % 8 == 0 and w == sched.widths_at(progress)[name] or name not in sched.changes
    assert _widths(model) == _widths(one_shot)
    assert len(sched.history) >= 2  # it really went in steps


def test_iterative_structured_compress_follows_schedule_and_exports(tmp_path):
    task = _task("plain_cnn")
    torch.manual_seed(0)
    teacher = task.model_fn().eval()
    plan = Plan(
        layers={
            "features.0": LayerPlan(bits=8, sparsity=0.5, sparsity_kind="structured"),
            "features.3": LayerPlan(bits=4, sparsity=0.5, sparsity_kind="structured"),
            "classifier": LayerPlan(bits=8, sparsity=0.5),  # masks on a layer whose inputs shrink
        },
        schedule=Schedule("linear", 0.0, 0.5, steps=2),
        epochs=2,
        hints=("features.3",),
        hint_weight=0.1,
    )
    seen = []
    out = compress(
        task, teacher, plan, batch_size=16, on_epoch=lambda e, loss, m: seen.append(_widths(m)["features.3"])
    )
    # 96 samples / 16 = 6 steps per epoch, 12 in all: widths change at step 3 (q = 0.5) and 6 (q = 1)
    assert out.channel_steps == [
        (0.25, {"features.0": 12, "features.3": 24}),
        (0.5, {"features.0": 8, "features.3": 16}),
    ]
    assert seen == [24, 16]
    assert "output channels 32 -> 16" in out.notes["features.3"]
    model = out.model
    assert _widths(model) == {"features.0": 8, "features.3": 16, "classifier": 10}
    w = model.classifier.weight
    assert w.shape == (10, 16) and int((w == 0).sum()) == round(0.5 * w.numel())
    assert not any(hasattr(m, "parametrizations") for m in model.modules())
    assert all(np.isfinite(out.losses))
    backend = OnnxRuntimeBackend()
    x = task.test[0][:8]
    art = backend.lower(model, task.example_inputs(), out.lowering, tmp_path, task.calibration_inputs(32))
    got = backend.session(art.path).run(None, {"input": x.numpy()})[0]
    assert np.isfinite(got).all()  # activations are quantized in the artifact: close, not equal
    np.testing.assert_allclose(got, model(x).detach().numpy(), atol=2e-2)


def test_iterative_structured_pruning_with_learned_step_sizes(tmp_path):
    """LSQ keeps one learned step per output channel: a layer that loses channels mid-training gets
    steps for its smaller weight, and the artifact holds the steps it ended with."""
    task = _task("plain_cnn")
    torch.manual_seed(0)
    plan = Plan(
        layers={
            "features.0": LayerPlan(bits=8, sparsity=0.5, sparsity_kind="structured"),
            "features.3": LayerPlan(bits=4, sparsity=0.5, sparsity_kind="structured"),
        },
        schedule=Schedule("linear", 0.0, 0.5, steps=2),
        epochs=2,
        lsq=True,
    )
    out = compress(task, task.model_fn().eval(), plan, batch_size=16)
    assert _widths(out.model) == {"features.0": 8, "features.3": 16, "classifier": 10}
    rec = out.lowering.layer("features.3").weight  # recorded by compress from the LSQ quantizer
    assert rec.lsq and rec.scale.shape == (16,) and rec.q.shape[0] == 16
    art = OnnxRuntimeBackend().lower(
        out.model, task.example_inputs(), out.lowering, tmp_path, task.calibration_inputs(32)
    )
    got = OnnxRuntimeBackend().session(art.path).run(None, {"input": task.test[0][:8].numpy()})[0]
    np.testing.assert_allclose(got, out.model(task.test[0][:8]).detach().numpy(), atol=2e-2)


def test_one_shot_schedule_still_prunes_before_fine_tuning():
    task = _task("plain_cnn", n=32)
    torch.manual_seed(0)
    plan = Plan(
        layers={"features.3": LayerPlan(sparsity=0.5, sparsity_kind="structured")},
        schedule=Schedule("one_shot", 0.5),
        epochs=1,
    )
    out = compress(task, task.model_fn().eval(), plan, round_to=8)
    assert out.channel_steps == [] and _widths(out.model)["features.3"] == 16


# --- B. CP decomposition ----------------------------------------------------------------------------


def test_cp_error_falls_with_rank_and_exact_rank_reproduces_the_conv():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 3, stride=2, padding=1, dilation=1)
    x = torch.randn(2, 8, 11, 11)
    ref = conv(x).detach()
    errors = [float((factorize_cp(conv, r)(x).detach() - ref).norm() / ref.norm()) for r in (2, 4, 8, 16, 32)]
    assert all(a > b for a, b in itertools.pairwise(errors)), errors
    # a kernel that is a sum of 5 rank-one terms is recovered at rank 5 (stride/padding/dilation kept)
    conv = nn.Conv2d(8, 12, (3, 5), stride=(2, 1), padding=(2, 1), dilation=(2, 1))
    a = [torch.randn(d, 5) for d in (12, 8, 3, 5)]
    with torch.no_grad():
        conv.weight.copy_(torch.einsum("or,cr,ir,jr->ocij", *a))
    cp = factorize_cp(conv, 5)
    assert [type(m) for m in cp] == [nn.Conv2d] * 4
    assert cp[1].groups == cp[2].groups == 5 and cp[1].kernel_size == (3, 1) and cp[2].kernel_size == (1, 5)
    ref = conv(x).detach()
    torch.testing.assert_close(cp(x).detach(), ref, atol=1e-4 * float(ref.abs().max()), rtol=1e-4)


def test_cp_plan_lowers_macs_and_skips_where_it_cannot_pay():
    conv = nn.Conv2d(32, 32, 3, padding=1)
    new, why = plan_factorization(conv, "cp", 0.25)
    assert why == "cp rank 8/32" and len(new) == 4
    assert cp_macs(conv, 8) == 8 * (32 + 3 + 3 + 32) < 32 * 32 * 9
    new, why = plan_factorization(nn.Conv2d(8, 8, 3, groups=8), "cp", 0.5)
    assert new is None and "depthwise/grouped" in why
    new, why = plan_factorization(nn.Linear(16, 16), "cp", 0.5)
    assert new is None and "cp needs a Conv2d" in why
    new, why = plan_factorization(nn.Conv2d(1, 1, 2), "cp", 0.5)  # rank 1: 1+2+2+1 MACs >= 4
    assert new is None and "6 MACs >= original 4" in why
    with pytest.raises(TechniqueError, match="groups=1"):
        factorize_cp(nn.Conv2d(8, 8, 3, groups=2), 4)
    assert LayerPlan(rank_mode="cp", rank_ratio=0.5).rank_mode == "cp"
    SearchSpace.from_dict({"rank_mode": {"choices": ["ratio", "cp"]}})


def test_cp_factorized_model_exports_through_onnxruntime(tmp_path):
    task = _task("plain_cnn", n=32)
    torch.manual_seed(0)
    teacher = task.model_fn().eval()
    plan = Plan(layers={"features.3": LayerPlan(rank_ratio=0.5, rank_mode="cp")}, epochs=0)
    out = compress(task, teacher, plan)
    assert out.notes["features.3"] == "cp rank 16/32"
    model = out.model
    assert len(model.features[3]) == 4
    x = task.test[0][:8]
    art = OnnxRuntimeBackend().lower(model, task.example_inputs(), out.lowering, tmp_path)
    got = OnnxRuntimeBackend().session(art.path).run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, model(x).detach().numpy(), atol=1e-4, rtol=1e-4)


# --- C. sensitivity narrowing -------------------------------------------------------------------


def _study_file(tmp_path, **trials) -> str:
    study = tmp_path / "narrow.yaml"
    study.write_text(
        yaml.safe_dump(
            {
                "name": "narrow",
                "task": {"name": "tiny_tasks:sensitive_mlp"},
                "space": {
                    "file": str(ROOT / "autocompress/search_spaces/default.yaml"),
                    "overrides": {
                        "bits": {"choices": [4, 8, 32]},
                        "sparsity": {"fixed": 0.0},
                        "rank_ratio": {"fixed": 1.0},
                        "sparsity_kind": {"fixed": "unstructured"},
                        "rank_mode": {"fixed": "ratio"},
                        "layers": {},
                    },
                },
                "finetune": {"epochs": 0, "threads": 1},
                "trials": {"n": 1, "warm_start": [{"bits": 4}], **trials},
                "output": str(tmp_path / "run"),
            }
        )
    )
    return str(study)


def test_sensitivity_narrowing_drops_harmful_choices_and_survives_resume(tmp_path):
    lines: list[str] = []
    cfg = load_config(_study_file(tmp_path, sensitivity_narrow=0.05))
    run_study(cfg, log=lines.append)
    study = optuna.load_study(study_name="narrow", storage=cfg.storage_url())
    narrowed = study.user_attrs["narrowed_domains"]
    assert narrowed == {"bits.0": {"choices": [8, 32]}}  # the robust classifier keeps 4 bits
    summary = [s for s in lines if s.startswith("sensitivity narrowing")]
    assert summary == [
        "sensitivity narrowing (max drop 0.05): 1 domains narrowed: bits.0 {4, 8, 32} -> {8, 32}"
    ]
    first = study.get_trials()[0]
    assert first.distributions["bits.0"].choices == (8, 32)
    assert first.distributions["bits.2"].choices == (4, 8, 32)
    assert first.params["bits.2"] == 4  # the warm start keeps 4 bits where it is allowed
    # resume with another threshold: the study's domains stay (Optuna's resume needs them)
    cfg2 = load_config(_study_file(tmp_path, sensitivity_narrow=1.0))
    with open_run(cfg2, log=lambda s: None) as (ctx, st):
        assert set(ctx.space.narrowed) == {"bits.0"}
        assert ctx.space.narrowed["bits.0"].choices == [8, 32]
        trial = st.ask()
        plan = ctx.space.suggest(trial, ctx.inventory, epochs=0, lr=1e-3, seed=0)
        assert plan.layers["0"].bits in (8, 32)
        assert trial.distributions["bits.0"].choices == (8, 32)


def test_narrow_domains_never_empties_and_shrinks_ranges():
    import pandas as pd

    from autocompress.inspection import narrow_domains
    from autocompress.inventory import LayerInfo

    inv = [LayerInfo(n, "Linear", 4, 4, (1,), 1, 20, 16, 4) for n in ("a", "b")]
    space = SearchSpace.from_dict(
        {
            "bits": {"choices": [4, 8]},
            "sparsity": {"low": 0.0, "high": 0.9, "step": 0.1},
            "rank_ratio": {"low": 0.2, "high": 1.0},
        }
    )
    rows = [
        ("a", "bits", 8, 0.5),
        ("a", "bits", 4, 0.6),
        ("a", "sparsity", 0.5, 0.01),
        ("a", "sparsity", 0.8, 0.3),
        ("a", "rank_ratio", 0.5, 0.01),
        ("a", "rank_ratio", 0.25, 0.2),
        ("b", "bits", 8, 0.0),
        ("b", "bits", 4, 0.0),
    ]
    df = pd.DataFrame(
        [dict(layer=l, dimension=d, value=v, metric_drop=x, applied=True) for l, d, v, x in rows]  # noqa: E741
    )
    out = narrow_domains(space, inv, df, 0.05)
    assert out["bits.a"] == {"choices": [8]}  # every choice too harmful: the mildest stays
    assert out["sparsity.a"]["high"] == pytest.approx(0.5) and out["sparsity.a"]["low"] == 0.0
    assert out["rank.a"]["low"] == 0.5 and out["rank.a"]["high"] == 1.0
    assert not any(k.endswith(".b") for k in out)
    space.narrow(out)
    assert space._layer_params("a")["bits"].choices == [8]
    assert space._layer_params("b")["bits"].choices == [4, 8]
