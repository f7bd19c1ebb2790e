"""Where an artifact's time goes: ONNX Runtime's per-operator profile of a run's baseline and front models.

For a run folder (``autocompress run`` wrote it), the float baseline artifact and the front's fastest
models are each run through ONNX Runtime with its profiler on (the backend's session options: full
graph optimizations, 1 intra-op thread, batch 1), ``--calls`` times after a warm-up. Per artifact it
prints the wall time per call without the profiler, the operator nodes ORT runs after its graph
optimizations, and each op type's share of the profiled kernel time (the profiler's ``Node`` events,
summed; the profiler adds a cost to every node, so absolute profiled times run high and only the shares
and node counts compare).

Used for ``mnist1d_transformer``: at dim 64 and 10 tokens its kernels are a few microseconds each, and
the profile shows whether int8 / factorized candidates lose on kernel time or on operator count.

Usage::

    python benchmarks/op_profile.py runs/mnist1d_transformer            # baseline + 3 fastest front models
    python benchmarks/op_profile.py runs/mnist1d_transformer --trials 4 12 --calls 2000
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ONNX_TO_NUMPY = {1: np.float32, 6: np.int32, 7: np.int64, 9: np.bool_, 10: np.float16, 11: np.float64}


def example_feed(path: Path) -> dict:
    """Random inputs for the model's declared inputs, every dynamic dimension set to 1."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    init = {i.name for i in model.graph.initializer}
    feed = {}
    rng = np.random.default_rng(0)
    for inp in model.graph.input:
        if inp.name in init:
            continue
        t = inp.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else 1 for d in t.shape.dim]
        dtype = ONNX_TO_NUMPY.get(t.elem_type)
        if dtype is None:
            raise SystemExit(
                f"{path}: input {inp.name!r} has ONNX element type {t.elem_type}, not handled here"
            )
        if np.issubdtype(dtype, np.integer):
            feed[inp.name] = rng.integers(0, 2, size=shape).astype(dtype)
        else:
            feed[inp.name] = rng.standard_normal(shape).astype(dtype)
    return feed


def profile(path: Path, calls: int, threads: int) -> dict:
    """Wall time per call and kernel time per call by op type (microseconds)."""
    import onnxruntime as ort

    feed = example_feed(path)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    plain = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    for _ in range(max(50, calls // 10)):
        plain.run(None, feed)
    t0 = time.perf_counter()
    for _ in range(calls):
        plain.run(None, feed)
    wall_us = (time.perf_counter() - t0) / calls * 1e6  # without the profiler's own cost

    so.enable_profiling = True
    so.profile_file_prefix = str(Path("/tmp") / f"op_profile_{path.parent.name}")
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    for _ in range(max(50, calls // 10)):
        sess.run(None, feed)
    for _ in range(calls):
        sess.run(None, feed)
    trace = Path(sess.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink()
    by_op: dict[str, float] = defaultdict(float)
    nodes: dict[str, set] = defaultdict(set)
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    timed = runs[-calls:]  # the last `calls` runs are the timed loop (the warm-up ran before)
    first_ts = timed[0]["ts"] if timed else 0
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time") or e["ts"] < first_ts:
            continue
        op = e.get("args", {}).get("op_name", "?")
        by_op[op] += e["dur"]
        nodes[op].add(e["name"])
    run_us = float(np.mean([e["dur"] for e in timed])) if timed else float("nan")
    return {
        "wall_us": wall_us,
        "profiled_run_us": run_us,
        "ops": {op: (us / calls, len(nodes[op])) for op, us in by_op.items()},
    }


def front_dirs(run: Path, n: int) -> list[tuple[str, Path, float]]:
    front = json.loads((run / "pareto" / "front.json").read_text())
    rows = front if isinstance(front, list) else front.get("front", [])
    rows = sorted(rows, key=lambda r: -(r.get("speedup") or 0.0))[:n]
    return [(r["source"], run / r["source"] / "model.onnx", r.get("speedup") or 0.0) for r in rows]


def trial_artifact(run: Path, n: int) -> Path:
    """A trial's artifact: its own folder while the run keeps it, else its copy among the front's."""
    from autocompress.rundir import pareto_folder_name, trial_dir

    kept = trial_dir(run, n) / "model.onnx"
    for path in (kept, run / pareto_folder_name(n) / "model.onnx"):
        if path.exists():
            return path
    return kept


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="a run folder written by autocompress run")
    p.add_argument(
        "--trials", type=int, nargs="*", default=None, help="trial numbers (default: the front's fastest)"
    )
    p.add_argument("--front", type=int, default=3, help="how many of the front's fastest models")
    p.add_argument("--calls", type=int, default=1000)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()

    base = args.run / "baseline" / "model.onnx"
    if not base.exists():
        print(f"{args.run}: no baseline/model.onnx (not a finished run folder)", file=sys.stderr)
        return 2
    targets = [("baseline", base, 1.0)]
    if args.trials:
        targets += [(f"trial-{n:05d}", trial_artifact(args.run, n), float("nan")) for n in args.trials]
    else:
        targets += front_dirs(args.run, args.front)
    for _name, path, _ in targets:
        if not path.exists():
            print(f"{path}: no such artifact", file=sys.stderr)
            return 2

    results = {name: profile(path, args.calls, args.threads) for name, path, _ in targets}
    ops = sorted(
        {op for r in results.values() for op in r["ops"]},
        key=lambda op: -results["baseline"]["ops"].get(op, (0, 0))[0],
    )
    names = [n for n, _, _ in targets]
    width = max(12, *(len(n) for n in names))
    print(f"per call, microseconds, batch 1, {args.threads} thread(s), {args.calls} calls each")
    print(f"{'':<24}" + "".join(f"{n:>{width + 8}}" for n in names))
    print(f"{'wall (no profiler)':<24}" + "".join(f"{results[n]['wall_us']:>{width + 8}.1f}" for n in names))
    print(
        f"{'speedup vs baseline':<24}"
        + "".join(f"{results['baseline']['wall_us'] / results[n]['wall_us']:>{width + 7}.2f}x" for n in names)
    )
    kernel = {n: sum(us for us, _ in results[n]["ops"].values()) for n in names}
    print(
        f"{'operator nodes':<24}"
        + "".join(f"{sum(c for _, c in results[n]['ops'].values()):>{width + 8}d}" for n in names)
    )
    print(
        f"{'kernels / profiled run':<24}"
        + "".join(f"{kernel[n] / results[n]['profiled_run_us']:>{width + 7}.0%} " for n in names)
    )
    print("share of kernel time by op type (nodes); the profiler adds a cost per node, so compare shares:")
    for op in ops:
        cells = []
        for n in names:
            us, c = results[n]["ops"].get(op, (0.0, 0))
            cells.append(f"{us / kernel[n]:>{width + 2}.1%} ({c:>2d})" if c else f"{'-':>{width + 7}} ")
        print(f"  {op:<22}" + "".join(cells))
    out = args.run / "op_profile.json"
    out.write_text(json.dumps({"calls": args.calls, "threads": args.threads, "results": results}, indent=1))
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
