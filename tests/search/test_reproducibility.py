"""Reproducibility and disk: the same study and seed give the same plans (and, the fine-tune being
deterministic, the same accuracies); `rebuild` re-creates an artifact from its stored plan;
`trials.keep: pareto` keeps only the front's artifacts."""

from __future__ import annotations

import json

import pytest
from conftest import ROOT
from reliability_helpers import check_consistent, cli, cli_here, load, sha, study_file

pytestmark = pytest.mark.slow


def test_same_seed_same_plans_rebuild_and_keep_pareto(tmp_path):
    # B times with the backend's default rounds (not the helpers' short ones) and its timing worker: the
    # speedups of its rebuilds are checked below; A's timings are never compared (its plans, metrics, sizes
    # and artifacts are), so A times in its own process
    a_file, a_run = study_file(tmp_path / "a", name="rep", backend__options__isolate=False)
    b_file, b_run = study_file(tmp_path / "b", name="rep", trials__keep="pareto", backend__options={})
    n = 4
    for f in (a_file, b_file):
        proc = cli("run", f)
        assert proc.returncode == 0, proc.stderr[-3000:]
    # keep=pareto and the rebuild of a deleted trial need a dominated trial: whether one of the first 4
    # random plans is dominated depends on timings, so both studies go on (in step) until one is
    while not set(t.number for t in load(b_run).trials) - {t.number for t in load(b_run).best_trials}:
        assert n < 10, "no dominated trial among 10 random plans"
        n += 2
        for f in (a_file, b_file):
            proc = cli("run", f, "--n-trials", n)
            assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = load(a_run), load(b_run)
    assert len(a.trials) == len(b.trials) == n
    # the same plans in the same order, and a deterministic fine-tune: the same accuracies, exactly
    assert [t.user_attrs["plan"] for t in a.trials] == [t.user_attrs["plan"] for t in b.trials]
    assert [t.values[0] for t in a.trials] == [t.values[0] for t in b.trials]
    assert [t.values[2] for t in a.trials] == [t.values[2] for t in b.trials]
    for t in a.trials:  # what a rebuild needs is recorded with every trial
        env = t.user_attrs["environment"]
        assert t.user_attrs["seed"] == 0 and t.user_attrs["finetune_threads"] == 1
        assert env["device"] == "cpu" and env["backend"] == "onnxruntime"
        assert {"version.torch", "version.onnxruntime", "version.onnx"} <= set(env)
    check_consistent(a_run, n)
    # keep=pareto: only the front's folders remain; the others' records stay in the storage
    check_consistent(b_run, n, keep="pareto")
    front = {t.number for t in b.best_trials}
    dominated = sorted({t.number for t in b.trials} - front)
    assert all("plan" in b.trials[n].user_attrs for n in dominated)

    # rebuild a deleted (dominated) trial and a front trial from their stored plans
    for number in (dominated[0], min(front)):
        proc = cli("rebuild", b_run, number)
        assert proc.returncode == 0, proc.stderr[-3000:]
        print(proc.stdout)
        folder = b_run / "rebuilt" / f"trial-{number:05d}"
        report = json.loads((folder / "rebuild.json").read_text())
        stored = b.trials[number]
        assert report["metric_identical"] and report["metric_rebuilt"] == stored.values[0]
        assert "(identical)" in proc.stdout
        # the same integers and graph: byte-identical to the artifact run A kept for this trial
        assert sha(folder / "model.onnx") == sha(a_run / a.trials[number].user_attrs["artifact"])
        assert report["size_bytes_rebuilt"] == stored.values[2]
        # latency: the ratio timed side by side with the baseline in each session agrees within 1.5x when
        # both sessions timed calmly (each of the four timings' IQR within 10% of its median), or the
        # latencies agree within the spread the two measurements report. These artifacts run in ~0.03 ms:
        # on a loaded CI runner one study's ratios were 1.8x off the rebuild's (the larger of the two
        # sessions' IQRs 17% of the stored median),
        # so a noisy session is held to 3x only
        within = (
            abs(report["latency_ms_rebuilt"] - report["latency_ms_stored"]) <= report["latency_spread_ms"]
        )
        timings = [report[f"{w}_stats_{s}"] for w in ("latency", "baseline") for s in ("stored", "rebuilt")]
        calm = all(t["iqr_ms"] <= 0.1 * t["median_ms"] for t in timings)
        bound = 1.5 if calm else 3.0
        ratio = report["speedup_rebuilt"] / report["speedup_stored"]
        assert within or 1 / bound < ratio < bound, (calm, report)
        # the verdict printed is the one the figures give
        assert report["latency_within_spread"] == within
        word = "within" if within else "OUTSIDE"
        assert f"{word} the measurement spread of {report['latency_spread_ms']:.4f} ms" in proc.stdout
    assert not (b_run / "trials" / f"{dominated[0]:05d}").exists()  # rebuild writes a new folder

    bad = cli_here("rebuild", b_run, 99)
    assert bad.returncode == 2 and bad.stderr.strip().endswith(
        f"no trial 99 (the study has trials 0..{n - 1})"
    )


def test_size_floor_is_a_lower_bound_of_real_artifacts(digits_task, digits_teacher, tmp_path):
    """min_artifact_bytes never exceeds the size of an artifact at the space's smallest settings."""
    from autocompress.backends import BACKENDS
    from autocompress.inventory import build_inventory
    from autocompress.pipeline import compress
    from autocompress.plan import LayerPlan, Plan
    from autocompress.search.preflight import min_artifact_bytes
    from autocompress.space import SearchSpace

    inventory = build_inventory(digits_teacher, digits_task.example_inputs())
    backend = BACKENDS.get("onnxruntime")()
    try:
        for bits, ratio in ((4, 0.1), (8, 0.5), (32, 1.0)):
            space = SearchSpace.from_file(
                ROOT / "autocompress/search_spaces/default.yaml",
                {
                    "bits": {"choices": [bits, 32]},
                    "rank_ratio": {"low": ratio, "high": 1.0},
                    "sparsity": {"fixed": 0.0},
                },
            )
            floor = min_artifact_bytes(space, inventory)
            plan = Plan(layers={i.name: LayerPlan(bits=bits, rank_ratio=ratio) for i in inventory}, epochs=0)
            result = compress(digits_task, digits_teacher, plan, reduce_range=backend.reduce_range)
            artifact = backend.lower(
                result.model,
                digits_task.example_inputs(),
                result.lowering,
                tmp_path / f"{bits}-{ratio}",
                calibration=digits_task.calibration_inputs(),
            )
            assert floor <= artifact.size_bytes, (bits, ratio, floor, artifact.size_bytes)
            if bits == 32:  # where the weights dominate the file, the bound is close (not vacuous)
                assert floor > 0.8 * artifact.size_bytes, (floor, artifact.size_bytes)
    finally:
        backend.close()
