"""The HTML report and its hypervolume: a real Optuna study (SQLite) laid out as the runner writes it."""

from __future__ import annotations

import optuna
import pytest

from autocompress.pareto import HV_REFERENCE, hypervolume_history, normalized_objectives
from autocompress.report import layer_table, study_hypervolume
from autocompress.report_html import write_report

PNG = b"\x89PNG\r\n\x1a\n"
BASE = {"metric": 0.95, "latency_ms": 0.2, "size_bytes": 100_000}
LAYERS = ("features.0", "classifier")


def _plan(bits: int, sparsity: float, rank: float) -> dict:
    lp = {
        "bits": bits,
        "sparsity": sparsity,
        "rank_ratio": rank,
        "sparsity_kind": "structured",
        "rank_mode": "ratio",
    }
    return {"layers": {name: dict(lp) for name in LAYERS}}


def _study(tmp_path, results: list[tuple | str]) -> optuna.Study:
    """results: (accuracy, speedup, size_ratio, bits, sparsity, rank) per completed trial, or a failure reason."""
    study = optuna.create_study(
        study_name="demo",
        storage=f"sqlite:///{tmp_path / 'study.db'}",
        directions=["maximize", "minimize", "minimize"],
    )
    study.set_user_attr("baseline", BASE)
    study.set_user_attr("config", {"task": {"name": "digits"}, "budgets": {"max_metric_drop": 0.05}})
    study.set_user_attr("environment", {"backend": "onnxruntime", "device": "cpu", "device_name": "test CPU"})
    for r in results:
        t = study.ask()
        t.suggest_categorical("bits.features.0", [4, 8, 32])
        if isinstance(r, str):
            t.set_user_attr("fail_reason", r)
            t.set_user_attr("fail_category", r.split(":")[0])
            study.tell(t, state=optuna.trial.TrialState.FAIL)
            continue
        acc, speedup, size_ratio, bits, sparsity, rank = r
        m = {
            "metric": acc,
            "latency_ms": BASE["latency_ms"] / speedup,
            "size_bytes": int(BASE["size_bytes"] / size_ratio),
            "speedup": speedup,
            "size_ratio": size_ratio,
            "metric_drop": BASE["metric"] - acc,
            "metric_drop_rel": (BASE["metric"] - acc) / BASE["metric"],
            "plan": _plan(bits, sparsity, rank),
            "notes": {"classifier": "factorization skipped: more MACs"},
            "artifact": f"trials/{t.number:05d}/model.onnx",
        }
        for k, v in m.items():
            t.set_user_attr(k, v)
        t.set_constraint("metric_drop", m["metric_drop"] - 0.05)
        study.tell(t, [m["metric"], m["latency_ms"], m["size_bytes"]])
    return study


def test_hypervolume_of_hand_computed_boxes():
    ref = (1.0, 1.0, 1.0)
    # one point (0.5, 0.5, 0.5): a box of 0.125; a second (0, 0.75, 0.75) adds 0.5*0.25*0.25 = 0.03125
    # beyond the first's box: union = 0.125 + 1*0.25*0.25 - overlap 0.5*0.25*0.25 = 0.15625
    hv = hypervolume_history([(0.5, 0.5, 0.5), None, (0.0, 0.75, 0.75), (2.0, 0.1, 0.1)], ref)
    assert hv == pytest.approx([0.125, 0.125, 0.15625, 0.15625])  # None and points outside add nothing
    assert normalized_objectives(0.05, 2.0, 4.0) == pytest.approx((0.05, 0.5, 0.25))
    # normalized by the reference box: a lossless model at 2x speed and 4x smaller
    assert hypervolume_history([(0.0, 0.5, 0.25)])[0] == pytest.approx(1 * 0.5 * 0.75)


def test_html_report_sections_values_and_pngs(tmp_path):
    study = _study(
        tmp_path,
        [
            (0.95, 1.2, 3.5, 8, 0.0, 1.0),
            "timeout: trial ran past trials.trial_timeout_s (300 s) in fine-tuning",
            (0.93, 2.5, 9.0, 8, 0.5, 1.0),
            (0.70, 4.0, 20.0, 4, 0.8, 0.3),  # over the 5-point budget: infeasible
            (0.92, 2.0, 8.0, 8, 0.4, 1.0),  # dominated by trial 2
        ],
    )
    paths = write_report(study, tmp_path)
    html = paths["html"].read_text()
    for section in (
        "<h2>Recommended model: trial 2",
        "<h2>Pareto front",
        "<h3>Projections",
        "<h3>Per-layer choices",
        "<h2>Diagnostics",
        "<h3>Summary",
        "<h3>Hypervolume history",
        "<h3>Failures by reason",
        "<h3>All trials",
    ):
        assert section in html, section
    assert (
        html.index("<h2>Recommended model") < html.index("<h2>Pareto front") < html.index("<h2>Diagnostics")
    )
    assert "onnxruntime / cpu (test CPU)" in html and "max_metric_drop 0.05" in html
    assert "trial ran past trials.trial_timeout_s (300 s)" in html and "<td>timeout</td>" in html
    assert html.count('src="data:image/png;base64,') == 3
    lt = layer_table(study)
    assert sorted(lt.trial.unique()) == [0, 2]  # the feasible front only
    row = lt[(lt.trial == 2) & (lt.layer == "features.0")].iloc[0]
    assert (row.bits, row.sparsity, row.rank_ratio) == (8, 0.5, 1.0)
    assert "<h3>trial 2</h3>" in html and "factorization skipped: more MACs" in html
    for name in ("pareto.png", "projections.png", "layers.png", "hypervolume.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG, name
    hv = [v for _, v in study_hypervolume(study)]
    assert len(hv) == 5 and all(b >= a for a, b in zip(hv, hv[1:], strict=False))
    assert HV_REFERENCE == (0.10, 1.0, 1.0)
    assert hv[0] == pytest.approx((1 - 1 / 1.2) * (1 - 1 / 3.5))  # lossless: the full 0.1 of the drop axis
    assert hv[3] == hv[2] and hv[4] == hv[2]  # infeasible and dominated trials add nothing
    # the storage stays a plain Optuna storage (what optuna-dashboard opens)
    again = optuna.load_study(study_name="demo", storage=f"sqlite:///{tmp_path / 'study.db'}")
    assert len(again.trials) == 5 and again.user_attrs["baseline"] == BASE


def test_report_of_a_run_with_no_completed_trial(tmp_path):
    study = _study(tmp_path, ["exception: RuntimeError: boom", "non-finite loss: NaN at step 3"])
    html = write_report(study, tmp_path)["html"].read_text()
    assert "no feasible completed trial yet" in html and "no Pareto model yet" in html
    assert "RuntimeError: boom" in html and "NaN at step 3" in html
    assert [v for _, v in study_hypervolume(study)] == [0.0, 0.0]


def test_report_of_a_run_stopped_before_its_first_trial(tmp_path):
    study = _study(tmp_path, [])
    out = write_report(study, tmp_path)
    assert out["trials"].read_text().splitlines()[0].startswith("trial,state,metric,latency_ms")
    assert len(out["trials"].read_text().splitlines()) == 1  # the header alone
    assert "no Pareto model yet" in out["html"].read_text()
    assert study_hypervolume(study) == []


def test_report_is_drawn_again_only_when_what_it_shows_changed(tmp_path):
    study = _study(tmp_path, [(0.95, 1.2, 3.5, 8, 0.0, 1.0)])
    paths = write_report(study, tmp_path)
    stamps = {k: p.stat().st_mtime_ns for k, p in paths.items()}
    assert paths["html"].read_text().startswith("<!-- autocompress report of ")
    assert write_report(study, tmp_path) == paths  # nothing changed: nothing rewritten
    assert {k: p.stat().st_mtime_ns for k, p in paths.items()} == stamps
    t = study.ask()  # a new trial (even a failed one) is shown: everything is drawn again
    t.suggest_categorical("bits.features.0", [4, 8, 32])
    t.set_user_attr("fail_reason", "exception: RuntimeError: late")
    study.tell(t, state=optuna.trial.TrialState.FAIL)
    html = write_report(study, tmp_path)["html"].read_text()
    assert "RuntimeError: late" in html and paths["plot"].stat().st_mtime_ns > stamps["plot"]
    (tmp_path / "coverage.json").write_text("{}")  # a run-folder file the report may show
    before = paths["html"].read_text().splitlines()[0]
    write_report(study, tmp_path)
    assert paths["html"].read_text().splitlines()[0] != before
    paths["plot"].unlink()  # a missing output is drawn again
    write_report(study, tmp_path)
    assert paths["plot"].read_bytes()[:8] == PNG
