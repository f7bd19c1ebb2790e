"""The report opens with the answer: the recommended model within the budgets, its artifact and a load
snippet that runs; then the front with units; then the diagnostics. A real Optuna study (SQLite) with
real ONNX artifacts laid out as the runner writes them; the page is also opened in headless Chromium
where it is installed."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import onnx
import optuna
import pytest
from onnx import TensorProto, helper, numpy_helper

from autocompress.export import export_front
from autocompress.report_answer import load_snippet, recommend, text_report
from autocompress.report_html import write_report
from autocompress.units import (
    fmt_bytes,
    fmt_drop,
    fmt_metric,
    fmt_ms,
    fmt_size_ratio,
    fmt_speedup,
    significant,
)

BASE = {"metric": 0.9612, "latency_ms": 0.02783, "size_bytes": 177_412, "metric_name": "accuracy"}


def _onnx(path: Path, width: int) -> None:
    """A real ONNX model (input ``x`` of shape (1, 16) float32 -> (1, width)) for the load snippet."""
    w = numpy_helper.from_array(np.full((16, width), 0.5, np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, width])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def _study(run: Path, results: list[tuple[float, float, float]], max_drop: float = 0.02) -> optuna.Study:
    """results: (accuracy, speedup, size_ratio) per completed trial, with the budget on the drop."""
    study = optuna.create_study(
        study_name="tiny",
        storage=f"sqlite:///{run / 'study.db'}",
        directions=["maximize", "minimize", "minimize"],
    )
    study.set_user_attr("baseline", BASE)
    study.set_user_attr("config", {"task": {"name": "digits"}, "budgets": {"max_metric_drop": max_drop}})
    study.set_user_attr("environment", {"backend": "onnxruntime", "device": "cpu", "device_name": "test CPU"})
    for acc, speedup, size_ratio in results:
        t = study.ask()
        t.suggest_categorical("bits.fc", [8, 32])
        art = run / "trials" / f"{t.number:05d}" / "model.onnx"
        _onnx(art, 2 + t.number)
        drop = BASE["metric"] - acc
        m = {
            "metric": acc,
            "metric_name": "accuracy",
            "latency_ms": BASE["latency_ms"] / speedup,
            "latency_p90_ms": 1.1 * BASE["latency_ms"] / speedup,
            "size_bytes": int(BASE["size_bytes"] / size_ratio),
            "speedup": speedup,
            "size_ratio": size_ratio,
            "metric_drop": drop,
            "metric_drop_rel": drop / BASE["metric"],
            "artifact": str(art.relative_to(run)),
            "plan": {"layers": {"fc": {"bits": 8}}},
        }
        for k, v in m.items():
            t.set_user_attr(k, v)
        t.set_constraint("metric_drop", drop - max_drop)
        study.tell(t, [acc, m["latency_ms"], m["size_bytes"]])
    return study


FRONT = [
    (0.9600, 1.20, 1.1),  # trial 0: most accurate, slow
    (0.9450, 2.47, 3.9),  # trial 1: the fastest within the 2-point budget -> recommended
    (0.9000, 3.80, 4.4),  # trial 2: over the budget
    (0.9500, 2.10, 3.5),  # trial 3: on the front (more accurate than 1), slower
]


class _Headings(HTMLParser):
    """The page's h1/h2 headings and section ids, in document order."""

    def __init__(self):
        super().__init__()
        self.items: list[tuple[str, str]] = []
        self._in: str | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "section":
            self.items.append(("section", dict(attrs).get("id", "")))
        if tag in ("h1", "h2"):
            self._in, self._text = tag, ""

    def handle_data(self, data):
        if self._in:
            self._text += data

    def handle_endtag(self, tag):
        if tag == self._in:
            self.items.append((tag, self._text.strip()))
            self._in = None


def _snippet(html: str) -> str:
    from html import unescape

    return unescape(html.split('<code class="language-python">')[1].split("</code>")[0])


def test_numbers_have_units_and_sensible_digits():
    assert [significant(v) for v in (0.027834, 40.123, 1234.6, 9.996, 0.0)] == [
        "0.0278",
        "40.1",
        "1235",
        "10.0",
        "0",
    ]
    assert fmt_ms(0.0027834) == "0.00278 ms" and fmt_ms(12.345) == "12.3 ms"
    assert fmt_speedup(2.4666) == "2.47x" and fmt_speedup(float("nan")) == "n/a"
    assert [fmt_bytes(n) for n in (812, 45_210, 177_412, 23_123_456, 2.5e9)] == [
        "812 B",
        "45.2 kB",
        "177 kB",
        "23.1 MB",
        "2.50 GB",
    ]
    assert fmt_metric(0.96123, "accuracy") == "96.12%" and fmt_metric(0.99981234, "fidelity") == "0.9998"
    assert fmt_drop(0.0052, 0.0054, "accuracy") == "0.52 pts worse (0.54%)"
    assert fmt_drop(-0.001, -0.00104, "accuracy") == "0.10 pts better (0.10%)"
    assert (
        fmt_drop(0.0123, 0.05, "mse") == "0.0123 worse (5.00%)"
        and fmt_drop(0.0, 0.0, "f1") == "same as baseline"
    )
    assert fmt_size_ratio(3.914) == "3.91x smaller" and fmt_size_ratio(0.8) == "1.25x larger"


def test_recommendation_rule():
    recs = [
        {"trial": 0, "metric": 0.96, "metric_drop": 0.001, "latency_ms": 0.02, "size_bytes": 100},
        {"trial": 1, "metric": 0.95, "metric_drop": 0.011, "latency_ms": 0.01, "size_bytes": 50},
        {"trial": 2, "metric": 0.90, "metric_drop": 0.061, "latency_ms": 0.005, "size_bytes": 40},
    ]
    # a metric budget: the fastest model within it
    assert recommend(recs, {"max_metric_drop": 0.02})[0]["trial"] == 1
    # no metric budget: the most accurate within the others (as autocompress pick)
    chosen, rule = recommend(recs, {"max_latency_ms": 0.015})
    assert chosen["trial"] == 1 and "most accurate" in rule
    assert recommend(recs, {})[0]["trial"] == 0
    assert recommend(recs, {"max_size_bytes": 10})[0] is None


def test_load_snippet_of_a_torch_program_is_three_lines():
    lines = load_snippet(Path("run/pareto/trial-00003/model.pt2")).splitlines()
    assert (
        len(lines) == 3
        and lines[1] == "model = torch.export.load('run/pareto/trial-00003/model.pt2').module()"
    )


def test_html_opens_with_the_recommended_model_and_its_snippet_runs(tmp_path):
    study = _study(tmp_path, FRONT)
    export_front(study, tmp_path)
    html = write_report(study, tmp_path)["html"].read_text()
    parser = _Headings()
    parser.feed(html)
    order = [v for k, v in parser.items if k in ("h2", "section")]
    # the first section after the title is the answer, then the front, then the diagnostics
    assert order[:2] == ["answer", "Recommended model: trial 1"], order
    assert order.index("front") < order.index("diagnostics")
    assert order.index("Pareto front (within the budgets)") < order.index("Diagnostics")
    answer = html.split('<section id="answer">')[1].split("</section>")[0]
    for shown in ("94.50%", "1.62 pts worse (1.69%)", "2.47x", "0.0113 ms", "45.5 kB (3.90x smaller)"):
        assert shown in answer, shown
    assert "96.12%" in answer and "0.0278 ms" in answer and "177 kB" in answer  # the baseline column
    assert "The fastest of the 3 Pareto models within the budgets" in answer
    assert str(tmp_path / "pareto" / "trial-00001" / "model.onnx") in answer
    # the snippet, as the page shows it, loads the exported artifact and runs it
    scope: dict = {}
    exec(_snippet(html), scope)  # noqa: S102 - the page's own three lines
    assert len(_snippet(html).splitlines()) == 3
    assert np.asarray(scope["outputs"][0]).shape == (1, 3)  # trial 1's model: width 2 + 1
    # the front: units, the recommended row marked, the infeasible trial 2 absent
    front = html.split('<section id="front">')[1].split("</section>")[0]
    assert "1 (recommended)" in front and "<td>2</td>" not in front and "0.0133 ms" in front
    assert "0.021592" not in html  # no raw floats of the front


def test_no_model_within_the_budgets_is_said_first(tmp_path):
    study = _study(tmp_path, [(0.90, 3.0, 4.0), (0.85, 4.0, 5.0)], max_drop=0.01)
    export_front(study, tmp_path)
    html = write_report(study, tmp_path)["html"].read_text()
    parser = _Headings()
    parser.feed(html)
    assert [v for k, v in parser.items if k in ("h2", "section")][:2] == [
        "answer",
        "No model within the budgets",
    ]
    assert (
        "2 completed trial(s)" in html
        and "max_metric_drop 0.01 (1.00 pts): missed by every trial (best metric_drop 0.0612 (6.12 pts))"
        in html
    )
    lines = text_report(study, tmp_path)
    assert lines[0].startswith("NO MODEL WITHIN THE BUDGETS (max_metric_drop 0.01): 2 completed trial(s)")


def test_text_report_has_the_same_order(tmp_path):
    study = _study(tmp_path, FRONT)
    export_front(study, tmp_path)
    lines = text_report(study, tmp_path)
    assert lines[0].startswith("RECOMMENDED: trial 1, the fastest of the 3 Pareto models")
    text = "\n".join(lines)
    assert (
        text.index("load it:") < text.index("Pareto front (within the budgets):") < text.index("diagnostics:")
    )
    assert "import numpy as np, onnxruntime as ort" in text and "45.5 kB" in text


def test_peers_are_shown_beside_the_recommended_model(tmp_path):
    study = _study(tmp_path, FRONT)
    export_front(study, tmp_path)
    rows = [
        {
            "kind": "peer",
            "name": "ort_dynamic",
            "label": "ORT quantize_dynamic",
            "status": "ok",
            "metric": 0.955,
            "drop": 0.0062,
            "drop_rel": 0.0065,
            "latency_ms": 0.025,
            "speedup": 1.11,
            "size_bytes": 60_000,
            "size_ratio": 2.96,
        },
        {"kind": "peer", "name": "olive", "status": "not installed"},
        {
            "kind": "autocompress",
            "name": "autocompress trial 1",
            "status": "ok",
            "trial": 1,
            "metric": 0.945,
            "speedup": 2.31,
        },
    ]
    (tmp_path / "peers").mkdir()
    (tmp_path / "peers" / "peers.json").write_text(json.dumps({"rows": rows}))
    answer = write_report(study, tmp_path)["html"].read_text().split('<section id="answer">')[1]
    answer = answer.split("</section>")[0]
    assert "ORT quantize_dynamic" in answer and "1.11x" in answer and "60.0 kB (2.96x smaller)" in answer
    assert "olive" not in answer and "the recommended model timed in that session: 2.31x" in answer


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(_chromium() is None, reason="no chromium on this machine (apt-get install chromium)")
def test_first_screen_in_headless_chromium_is_not_blank(tmp_path):
    """The page as a browser draws it at 1280x900 (the first screen): a PNG that is not blank, with the
    answer's green frame in it."""
    from PIL import Image

    study = _study(tmp_path, FRONT)
    export_front(study, tmp_path)
    page = write_report(study, tmp_path)["html"]
    png = tmp_path / "first_screen.png"
    cmd = [
        _chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        f"--screenshot={png}",
        "--window-size=1280,900",
        page.as_uri(),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert png.is_file(), done.stderr[-2000:]
    img = np.asarray(Image.open(png).convert("RGB"))
    assert img.shape[:2] == (900, 1280)
    assert (img < 128).all(axis=2).mean() > 0.005  # dark pixels: text was drawn
    green = (img[..., 1] > 140) & (img[..., 0] < 90) & (img[..., 2] < 160)  # the answer's frame (#2a7)
    assert green.sum() > 500, "the answer's frame is not in the first screen"
    print(f"screenshot: {png}", file=sys.stderr)


def test_a_recommended_model_slower_than_the_baseline_is_flagged(tmp_path):
    study = _study(tmp_path, [(0.955, 0.8, 1.2)])
    export_front(study, tmp_path)
    lines = text_report(study, tmp_path)
    assert lines[0].startswith("RECOMMENDED: trial 0, the only Pareto model within the budgets;")
    assert any("runs at 0.80x the baseline's speed" in s and "baseline/model.onnx" in s for s in lines)
