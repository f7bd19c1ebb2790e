"""The Python result: a tiny study run from Python without a study file, its front as objects, ``pick``
(the CLI's rule), ``load()`` run on the eval split against the recorded metric, ``to_pandas()``,
``load_result`` and ``configure()``'s one-line errors."""

from __future__ import annotations

import json

import numpy as np
import optuna
import pytest
import torch
from reliability_helpers import NO_TIMING_WORKER, QUICK_TIMING, cli_here
from torch import nn

import autocompress
from autocompress.backends import TorchBackend
from autocompress.result import COLUMNS, FrontModel
from autocompress.tasks import load_task

TASK = {"name": "digits", "options": {"width": 8, "teacher_epochs": 10}}
BUDGET = 0.3  # wide: the front holds the int8 and the float warm start (most accurate vs fastest)
EVAL_SAMPLES = 120


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    """4 trials on digits (int8 and float warm starts + 2 random plans), scored on 120 eval samples during
    the search and the front on the whole eval split; ~15 s on 2 cores."""
    out = tmp_path_factory.mktemp("api") / "run"
    cfg = autocompress.configure(
        name="api",
        task=TASK,
        space={"overrides": {"sparsity": {"low": 0.0, "high": 0.5, "step": 0.1}}},
        finetune={"epochs": 1, "threads": 1},
        backend={"options": {"timing": dict(QUICK_TIMING), **NO_TIMING_WORKER}},
        sampler={"name": "random"},
        budgets={"max_metric_drop": BUDGET},
        trials={"n": 4, "warm_start": [{"bits": 8}, {"bits": 32}], "eval_samples": EVAL_SAMPLES},
        output=str(out),
    )
    return autocompress.run_study(cfg, log=lambda line: None)


def _accuracy(session, inputs: list[np.ndarray], labels: np.ndarray) -> float:
    name = session.get_inputs()[0].name
    logits = np.concatenate([session.run(None, {name: x})[0] for x in inputs])
    return float((logits.argmax(1) == labels).mean())


def test_the_front_comes_back_as_objects(result):
    assert isinstance(result, autocompress.StudyResult) and isinstance(result.study, optuna.Study)
    assert result.completed == result.requested == 4 and result.stopped == "done"
    assert result.front and {m.trial for m in result.front} == {t.number for t in result.study.best_trials}
    front_json = json.loads((result.run_dir / "pareto" / "front.json").read_text())["front"]
    assert [r["trial"] for r in front_json] == [m.trial for m in result.front]
    base = result.baseline
    assert base.trial is None and base.speedup == 1.0 and base.artifact_path.is_file()
    for m, rec in zip(result.front, front_json, strict=True):
        t = result.study.trials[m.trial]
        assert m.artifact_path == result.run_dir / rec["folder"] / "model.onnx" and m.artifact_path.is_file()
        assert m.size_bytes == m.artifact_path.stat().st_size
        assert m.metric == t.values[0] and m.latency_ms == t.values[1] and m.metric_full == rec["metric_full"]
        assert m.metric_drop == pytest.approx(base.metric - m.metric)  # accuracy: higher is better
        assert m.speedup == pytest.approx(t.user_attrs["speedup"])
        assert m.size_ratio == pytest.approx(base.size_bytes / m.size_bytes)
        stats = t.user_attrs["latency"]  # as timed; latency_ms is on the baseline's scale
        assert m.latency_spread_ms == pytest.approx(stats["iqr_ms"] * m.latency_ms / stats["median_ms"])
        assert m.plan == autocompress.Plan.from_dict(t.user_attrs["plan"])
    best = result.recommended  # within the study's metric budget: the fastest, then the smallest
    fits = [m for m in result.front if m.metric_drop <= BUDGET + 1e-12]
    assert best is (min(fits, key=lambda m: (m.latency_ms, m.size_bytes)) if fits else None)


def test_pick_is_the_cli_rule_and_the_picked_model_runs_at_its_recorded_accuracy(result):
    chosen = result.pick(max_metric_drop=BUDGET)
    assert chosen.metric == max(m.metric for m in result.front)  # the most accurate within the budget
    proc = cli_here("pick", result.run_dir, "--max-metric-drop", str(BUDGET))
    assert proc.returncode == 0 and proc.stdout.splitlines()[0] == str(chosen.artifact_path.parent)
    assert result.pick(max_latency_ms=1e-9) is None
    assert result.pick(max_size_bytes=min(m.size_bytes for m in result.front)).size_bytes == min(
        m.size_bytes for m in result.front
    )

    task = load_task(TASK["name"], TASK["options"])
    batches = list(task.eval_split.batches())
    inputs = [x[0].numpy() for x, _ in batches]
    labels = torch.cat([y for _, y in batches]).numpy()
    n = len(labels)
    # the same artifact scored by the same runtime: equal up to one sample's flip (ORT's int8 kernels may
    # round differently at another batch size)
    tolerance = 1.0 / n
    session = chosen.load()
    assert _accuracy(session, inputs, labels) == pytest.approx(chosen.metric_full, abs=tolerance)
    sub = np.concatenate(inputs)[:EVAL_SAMPLES]
    assert _accuracy(session, [sub], labels[:EVAL_SAMPLES]) == pytest.approx(
        chosen.metric, abs=1 / EVAL_SAMPLES
    )
    base = result.baseline
    assert _accuracy(base.load(), inputs, labels) == pytest.approx(base.metric_full, abs=tolerance)


def test_to_pandas_and_load_result_agree_with_the_run(result):
    df = result.to_pandas()
    assert list(df.columns) == [*COLUMNS, "recommended"]
    assert list(df.trial) == [m.trial for m in result.front]
    assert df.recommended.sum() == (result.recommended is not None)
    again = autocompress.load_result(result.run_dir)
    assert [m.record() for m in again.front] == [m.record() for m in result.front]
    assert again.baseline == result.baseline and again.budgets == result.budgets
    assert again.completed == 4 and again.requested is None
    assert autocompress.load_run(result.run_dir).study_name == "api"


def test_load_gives_a_torch_module_for_a_torch_artifact(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).eval()
    x = torch.rand(4, 6)
    art = TorchBackend(isolate=False).lower(model, (x[:1],), {}, tmp_path)
    fm = FrontModel(
        trial=0, metric_name="accuracy", metric=1.0, metric_full=1.0, metric_drop=0.0, metric_drop_rel=0.0,
        latency_ms=1.0, latency_spread_ms=0.0, latency_p90_ms=1.0, speedup=1.0, size_bytes=art.size_bytes,
        size_ratio=1.0, plan=None, artifact_path=art.path,
    )  # fmt: skip
    loaded = fm.load()
    assert isinstance(loaded, nn.Module)
    torch.testing.assert_close(loaded(x), model(x))
    fm.artifact_path = tmp_path / "model.om"
    fm.artifact_path.write_bytes(b"om")
    with pytest.raises(autocompress.BackendError, match=r"load\(\) runs .onnx and .pt2 artifacts"):
        fm.load()


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"name": "x", "task": "digits"}, r"^configure\(\): task: Input should be a valid dictionary"),
        (
            {"name": "x", "task": {"name": "digits"}, "budgets": {"max_metric_drp": 0.1}},
            r"^configure\(\): budgets.max_metric_drp: unknown key \(did you mean 'max_metric_drop'\?\)",
        ),
        (
            {"name": "x", "task": {"name": "digits"}, "trials": {"n": 0}},
            r"^configure\(\): trials.n: Input should be greater than or equal to 1 \(got 0\)$",
        ),
        ({"name": "has space", "task": {}}, r"^configure\(\): name: String should match pattern"),
        ({"name": "x", "task": {}, "epochs": 3}, r"^configure\(\): epochs: unknown key; allowed: backend"),
    ],
)
def test_configure_refuses_bad_fields_in_one_line(fields, message):
    with pytest.raises(autocompress.ConfigError, match=message) as info:
        autocompress.configure(**fields)
    assert "\n" not in str(info.value)


def test_configure_takes_nested_dicts_and_config_objects():
    from autocompress.config import Budgets

    cfg = autocompress.configure(
        name="mine", task={"name": "digits"}, budgets=Budgets(max_metric_drop=0.01), trials={"n": 4}
    )
    assert cfg.budgets.max_metric_drop == 0.01 and cfg.trials.n == 4 and cfg.source == "configure()"
    assert cfg.output_dir().as_posix() == "runs/mine"


def test_recommend_is_the_fastest_under_a_metric_budget_else_the_most_accurate():
    from autocompress.pareto import recommend

    pts = [
        {"trial": 0, "metric": 0.99, "metric_drop": 0.0, "metric_drop_rel": 0.0, "latency_ms": 2.0, "size_bytes": 9},
        {"trial": 1, "metric": 0.97, "metric_drop": 0.02, "metric_drop_rel": 0.02, "latency_ms": 1.0, "size_bytes": 9},
        {"trial": 2, "metric": 0.97, "metric_drop": 0.02, "metric_drop_rel": 0.02, "latency_ms": 1.0, "size_bytes": 5},
        {"trial": 3, "metric": 0.90, "metric_drop": 0.09, "metric_drop_rel": 0.09, "latency_ms": 0.5, "size_bytes": 5},
    ]  # fmt: skip
    assert recommend(pts, max_metric_drop=0.05)["trial"] == 2
    assert recommend(pts, max_metric_drop_rel=0.1)["trial"] == 3
    assert recommend(pts, max_latency_ms=1.0)["trial"] == 2  # no metric budget: the most accurate
    assert recommend(pts)["trial"] == 0
    assert recommend(pts, max_metric_drop=0.05, max_size_bytes=4) is None


def test_run_study_refuses_a_missing_task_and_an_unknown_study_name_in_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        autocompress.ConfigError, match=r"^configure\(\): task.name: task.name is required \(or pass a Task"
    ):
        autocompress.run_study(autocompress.configure(name="x"), log=lambda line: None)
    with pytest.raises(
        autocompress.ConfigError, match=r"^quickstrt: study file does not exist, .*quickstart"
    ):
        autocompress.run_study("quickstrt", log=lambda line: None)
    assert list(tmp_path.iterdir()) == []
