"""The latency cache (structural fingerprint -> stats), the `measure` command, and cache hits in a study."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import ROOT, cli_env
from torch import nn

from autocompress.backends import LatencyCache, OnnxRuntimeBackend, timed_or_cached
from autocompress.backends.cache import cache_path


def _net(width: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(width * 64, 10)
    ).eval()


X = torch.rand(1, 1, 8, 8)
FAST = {"timing": {"max_s": 0.5, "min_repeats": 50}}


@pytest.fixture(scope="module")
def backend():
    be = OnnxRuntimeBackend(**FAST)
    yield be
    be.close()


def test_cache_store_persists_and_counts_hits(tmp_path):
    cache = LatencyCache(tmp_path / "c.db")
    assert cache.get("k") is None and cache.misses == 1
    cache.put("k", {"stats": {"median_ms": 1.0}})
    again = LatencyCache(tmp_path / "c.db")  # another process would see the same file
    hit = again.get("k")
    assert hit["stats"] == {"median_ms": 1.0} and hit["measured_at"] > 0
    assert again.hits == 1 and len(again) == 1
    assert cache_path("off", tmp_path) is None
    assert cache_path("run", tmp_path) == tmp_path / "latency_cache.db"
    assert cache_path("/x/y.db", tmp_path).as_posix() == "/x/y.db"


def test_same_structure_is_measured_once_with_its_side_by_side_ratio(tmp_path, backend):
    cache = LatencyCache(tmp_path / "c.db")
    base = backend.lower(_net(8, 0), (X,), {}, tmp_path / "base")
    a = backend.lower(_net(16, 1), (X,), {}, tmp_path / "a")
    b = backend.lower(_net(16, 2), (X,), {}, tmp_path / "b")  # other weights, same graph
    c = backend.lower(_net(24, 1), (X,), {}, tmp_path / "c")  # another structure
    lat_a, ref_a, cached_a = timed_or_cached(backend, cache, a, base, (X,))
    lat_b, ref_b, cached_b = timed_or_cached(backend, cache, b, base, (X,))
    assert (cached_a, cached_b) == (False, True)
    assert lat_b == lat_a and ref_b == ref_a  # the pair (and so the ratio) measured at the time
    _, _, cached_c = timed_or_cached(backend, cache, c, base, (X,))
    assert not cached_c
    assert (cache.hits, cache.misses, len(cache)) == (1, 2, 2)
    other = OnnxRuntimeBackend(threads=2, **FAST)  # other settings: another key
    try:
        assert not timed_or_cached(other, cache, b, base, (X,))[2]
    finally:
        other.close()


def test_measure_command_times_an_artifact_on_its_own(tmp_path, backend):
    art = backend.lower(_net(8, 0), (X,), {}, tmp_path)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "autocompress.cli",
            "measure",
            str(art.path),
            "--backend",
            "onnxruntime",
            "--device",
            "cpu",
            "--batch-size",
            "2",
            "--json",
        ],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    lat = out["latency"]
    assert lat["batch_size"] == 2
    # the stop rule: at least 100 calls when no round was set aside; on a loaded machine the disturbed
    # rounds are dropped (one block of 50 calls at least is kept), and the share dropped is reported
    assert lat["n"] >= 100 if lat["disturbed"] == 0 else (lat["n"] >= 50 and 0 < lat["disturbed"] < 1)
    assert lat["median_all_ms"] > 0
    assert out["latency"]["p90_ms"] >= out["latency"]["median_ms"] > 0
    assert out["environment"]["backend"] == "onnxruntime" and out["environment"]["device_count"] >= 1
    bad = subprocess.run(
        [sys.executable, "-m", "autocompress.cli", "measure", str(art.path), "--backend", "tensorrt"],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=120,
    )
    assert bad.returncode == 2 and "unknown backend 'tensorrt'" in bad.stderr


@pytest.mark.slow
def test_a_second_study_over_the_same_plans_hits_the_cache(tmp_path):
    from autocompress.config import load_config
    from autocompress.search import run_study

    data = {
        "name": "cache",
        "task": {"name": "digits", "options": {"width": 8, "teacher_epochs": 1}},
        "space": {"file": str(ROOT / "autocompress/search_spaces/default.yaml"), "overrides": {"bits": {"fixed": 32}}},
        "finetune": {"epochs": 0},
        "backend": {"latency_cache": str(tmp_path / "shared.db"), "options": FAST},
        "sampler": {"name": "random"},
        "trials": {"n": 2, "warm_start": []},
    }
    study = tmp_path / "s.yaml"
    study.write_text(yaml.safe_dump(data))
    lines = {1: [], 2: []}
    for run in (1, 2):
        cfg = load_config(study, {"output": str(tmp_path / f"run{run}")})
        summary = run_study(cfg, log=lines[run].append)
        cached = [t.user_attrs["latency_cached"] for t in summary.study.trials]
    assert cached == [True, True]
    assert sum("[latency from cache" in line for line in lines[2]) == 2
    assert not any("[latency from cache" in line for line in lines[1])
    env = summary.study.trials[0].user_attrs["environment"]
    assert env["backend"] == "onnxruntime" and env["device_name"] and "version.onnxruntime" in env
