"""benchmarks/peers.py without a study: the targets, the table, CPU features, and the peer rows (ORT's
quantizers on a tiny model; a peer whose package is not importable, or that raises, is a row with its
reason, never a crash). At the top of tests/: its folders mirror the package's, which has no benchmarks."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


peers = _load("peers")
_peers = sys.modules["_peers"]


def row(kind, name, metric, speedup, base=1.0, status="ok", sign=1):
    d, rel = peers.drops(metric, base, sign)
    return {
        "kind": kind,
        "name": name,
        "status": status,
        "metric": metric,
        "drop": d,
        "drop_rel": rel,
        "speedup": speedup,
        "latency_ms": 1.0 / speedup,
        "size_bytes": 1000,
        "size_ratio": 4.0,
        "wall_s": 3.0,
    }


def test_cpu_features_read_the_flags_line():
    text = "processor : 0\nflags\t\t: fpu sse avx2 avx512f avx512_vnni\nbugs : x\n"
    f = peers.cpu_features(text)
    assert f["avx2"] and f["avx512_vnni"] and f["avx512f"]
    assert not f["amx_int8"] and not f["avx_vnni"]
    assert not any(peers.cpu_features("").values())


def test_targets_met_missed_and_at_an_equal_or_better_metric():
    t = peers.Targets(max_drop=0.01, drop_kind="abs", min_speedup=3.0, min_vs_peer=1.5)
    rows = [
        row("baseline", "float baseline", 0.96, 1.0, 0.96),
        row("peer", "ort_static", 0.955, 3.0, 0.96),
        row("peer", "ort_dynamic", 0.90, 9.0, 0.96),  # fastest, but loses 6 points: not an answer
        row("autocompress", "autocompress trial 3", 0.958, 5.0, 0.96),
        row("autocompress", "autocompress trial 7", 0.951, 8.0, 0.96),  # within 1 point, below the peer
    ]
    res = dict((n, (m, w)) for n, m, w in peers.check_targets(rows, t))
    assert res["speedup"][0] and "trial 7" in res["speedup"][1]  # the fastest within the limit
    # vs peer: only front models at >= ort_static's 0.955 count: trial 3, 5.0 / 3.0 = 1.67x
    assert res["vs peer"][0] and "trial 3" in res["vs peer"][1] and "1.67x" in res["vs peer"][1]

    (info,) = peers.information(rows, t, 1, peers.check_targets(rows, t))  # at the limit, for information
    assert info[0] == "vs peer (any front model within the limit)" and "trial 7" in info[2]
    # trial 7 out of the limit: the figure at the limit is the target's, not repeated
    out = [*rows[:4], row("autocompress", "autocompress trial 7", 0.94, 8.0, 0.96)]
    assert peers.information(out, t, 1, peers.check_targets(out, t)) == []
    t.peer_compare = "limit"  # every front model within the limit: trial 7, 8.0 / 3.0
    assert "trial 7" in dict((n, w) for n, _, w in peers.check_targets(rows, t))["vs peer"]
    t.peer_compare, t.min_vs_peer = "metric", 2.0
    assert not dict((n, m) for n, m, _ in peers.check_targets(rows, t))["vs peer"]
    t.min_speedup, t.min_vs_peer = 10.0, None
    assert [(n, m) for n, m, _ in peers.check_targets(rows, t)] == [("speedup", False)]


def test_targets_without_a_front_model_or_a_peer():
    t = peers.Targets(max_drop=0.01, drop_kind="rel", min_speedup=2.5, min_vs_peer=1.5)
    rows = [row("peer", "ort_static", 0.99, 2.0), row("autocompress", "autocompress trial 1", 0.5, 9.0)]
    res = {n: (m, w) for n, m, w in peers.check_targets(rows, t)}
    assert not res["speedup"][0] and "no front model" in res["speedup"][1]
    assert not res["vs peer"][0]
    # peers that did not run are no comparison; a front model still has to be within the limit
    missing = {"kind": "peer", "name": "nncf_ac", "status": "not installed", "reason": "ImportError: x"}
    rows = [missing, row("autocompress", "a", 0.995, 3.0)]
    res = {n: (m, w) for n, m, w in peers.check_targets(rows, t)}
    assert res["speedup"][0]
    assert not res["vs peer"][0] and "no peer ran" in res["vs peer"][1]


def test_lower_is_better_metric():
    t = peers.Targets(max_drop=0.1, drop_kind="rel", min_speedup=None, min_vs_peer=1.5)
    rows = [
        row("peer", "p", 1.05, 2.0, base=1.0, sign=-1),
        row("autocompress", "a", 1.02, 3.5, base=1.0, sign=-1),
    ]
    assert rows[1]["drop"] == pytest.approx(0.02)  # an MSE above the baseline's is a drop
    [(name, met, why)] = peers.check_targets(rows, t, sign=-1)
    assert name == "vs peer" and met and "1.75x" in why


def test_search_wall_time_is_the_union_of_the_trials():
    assert peers.union_s([(0, 10), (5, 12), (20, 25)]) == 17  # two at once count once; the gap does not
    assert peers.union_s([(3, 4), (0, 10)]) == 10 and peers.union_s([]) == 0


def test_table_shows_every_row_and_the_reason_of_a_missing_peer():
    rows = [
        row("baseline", "float baseline", 0.96, 1.0, 0.96),
        {
            "kind": "peer",
            "name": "nncf_quantize",
            "status": "not installed",
            "reason": "ModuleNotFoundError: x",
        },
        row("autocompress", "autocompress trial 2", 0.958, 4.2, 0.96),
    ]
    text, md = peers.format_text(rows), peers.format_markdown(rows)
    assert "not installed: ModuleNotFoundError" in text and "4.20x" in text and "nncf_quantize" in md
    assert md.count("\n") == len(rows) + 1


@pytest.fixture
def tiny(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 8 * 8, 10)
    ).eval()
    x = torch.rand(40, 3, 8, 8)
    path = tmp_path / "float.onnx"
    torch.onnx.export(
        model,
        (x[:1],),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["input"],
        output_names=["output"],
        dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
    )
    y = model(x).argmax(1).numpy()
    samples = [((x[i : i + 1].numpy(),), y[i : i + 1], None) for i in range(len(x))]

    def score(p, items):
        s = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
        per = [float(s.run(None, {"input": a[0]})[0].argmax(1)[0] == t[0]) for a, t, _ in items]
        return float(np.mean(per)), per

    return _peers.PeerInput(
        float_onnx=path,
        names=["input"],
        calibration=(x.numpy(),),
        samples=samples,
        score_samples=score,
        reduce_range=True,
        workdir=tmp_path,
    )


@pytest.mark.parametrize("name", ["ort_dynamic", "ort_static"])
def test_ort_peers_write_a_quantized_model(tiny, name):
    res = _peers.run_peer(name, tiny, log=lambda s: None)
    assert res.status == "ok", res.reason
    assert res.path.is_file() and res.wall_s > 0 and "reduce_range=True" in res.settings
    ops = {n.op_type for n in __import__("onnx").load(str(res.path)).graph.node}
    assert (
        ("DynamicQuantizeLinear" in ops or "MatMulInteger" in ops)
        if name == "ort_dynamic"
        else "QuantizeLinear" in ops
    )
    acc, _ = tiny.score_samples(res.path, tiny.samples)
    assert acc > 0.5


@pytest.mark.parametrize("name,module", [("nncf_quantize", "nncf"), ("nncf_ac", "nncf"), ("olive", "olive")])
def test_a_peer_that_is_not_installed_is_a_row_with_the_reason(tiny, monkeypatch, name, module):
    monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError, installed or not
    res = _peers.run_peer(name, tiny, log=lambda s: None)
    assert res.status == "not installed" and res.path is None
    assert "Error" in res.reason and "pip install" in res.reason and module in res.reason


def test_a_peer_that_raises_is_a_failed_row(tiny):
    tiny.float_onnx.write_bytes(b"not an onnx model")
    res = _peers.run_peer("ort_static", tiny, log=lambda s: None)
    assert res.status == "failed" and res.reason and (tiny.workdir / "ort_static" / "error.txt").is_file()


def test_bad_input_exits_2(tmp_path, capsys):
    assert peers.main(["--front-from", str(tmp_path / "nope")]) == 2
    assert "not a run folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        peers.main(["--front-from", str(tmp_path), "--peers", "tensorrt"])
    assert e.value.code == 2
