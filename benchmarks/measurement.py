"""Can the latency numbers be trusted? Two checks, printed (not part of the test suite's pass/fail).

1. Reproducibility: the same artifact is measured by ``autocompress measure`` in 5 separate
   processes, one after the other; the spread of the 5 medians, (max - min) / median, must be at
   most 3% (exit code 1 otherwise).
2. The latency cache: a second study over the same plans (same seed, another run folder, a shared
   cache file) re-measures nothing: its trials are cache hits (printed, with the seconds spent timing).

Usage::

    python benchmarks/measurement.py                  # ONNX Runtime, CPU
    python benchmarks/measurement.py --backend torch --artifact path/model.pt2 --device cuda:0
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def conv_stack(width: int = 32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, 10),
    ).eval()


def make_artifact(backend: str, folder: Path) -> Path:
    from autocompress.backends import BACKENDS

    be = BACKENDS.get(backend)()
    try:
        return be.lower(conv_stack(), (torch.rand(1, 3, 16, 16),), {}, folder).path
    finally:
        be.close()


def reproducibility(artifact: Path, backend: str, device: str, runs: int, options: list[str]) -> float:
    medians, best = [], []
    for i in range(runs):
        cmd = [sys.executable, "-m", "autocompress.cli", "measure", str(artifact), "--backend", backend]
        cmd += ["--device", device, "--json", *[a for o in options for a in ("--option", o)]]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
        if out.returncode:
            sys.exit(f"measure failed: {out.stderr.strip()}")
        lat = json.loads(out.stdout)["latency"]
        medians.append(lat["median_ms"])
        best.append(lat["best_block_ms"])
        print(
            f"  process {i + 1}: median {lat['median_ms']:.4f} ms | p90 {lat['p90_ms']:.4f} ms | "
            f"IQR {lat['iqr_ms']:.4f} ms | n {lat['n']} | rel CI {lat['rel_ci']:.2%} | "
            f"best block {lat['best_block_ms']:.4f} ms | disturbed rounds set aside {lat.get('disturbed', 0):.0%}"
        )
    spread = (max(medians) - min(medians)) / statistics.median(medians)
    best_spread = (max(best) - min(best)) / statistics.median(best)
    print(f"spread of the {runs} medians: {spread:.2%} (max - min over median; limit 3%)")
    print(f"spread of the {runs} best-block medians (least disturbed by other processes): {best_spread:.2%}")
    return spread


def cache_across_studies(folder: Path, n: int) -> int:
    from autocompress.config import load_config
    from autocompress.search import run_study

    study = folder / "study.yaml"
    study.write_text(
        yaml.safe_dump(
            {
                "name": "cachebench",
                "task": {"name": "digits", "options": {"width": 16, "teacher_epochs": 2}},
                "space": {"file": str(ROOT / "autocompress/search_spaces/default.yaml")},
                "finetune": {"epochs": 0},
                "backend": {"latency_cache": str(folder / "latency.db")},
                "sampler": {"name": "random"},
                "trials": {"n": n},
                "seed": 0,
            }
        )
    )
    hits = 0
    for run in (1, 2):
        cfg = load_config(study, {"output": str(folder / f"run{run}")})
        t0 = time.perf_counter()
        summary = run_study(cfg, log=lambda line: None)
        wall = time.perf_counter() - t0
        trials = [t for t in summary.study.trials if t.state.name == "COMPLETE"]
        cached = sum(bool(t.user_attrs.get("latency_cached")) for t in trials)
        timing = sum(t.user_attrs["seconds"]["measure"] for t in trials)
        print(
            f"  study {run}: {len(trials)} trials, {cached} latency cache hits, "
            f"{timing:.2f} s spent timing, {wall:.1f} s wall"
        )
        hits = cached
    return hits


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="onnxruntime")
    p.add_argument("--device", default="cpu")
    p.add_argument("--artifact", type=Path, help="default: a 2-conv, 32-channel net on 16x16 inputs")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--trials", type=int, default=4)
    p.add_argument(
        "--option",
        action="append",
        default=None,
        help="backend option for the measuring processes (default: timing={target_rel_ci: 0.01, min_s: 3, max_s: 6, max_repeats: 100000})",
    )
    args = p.parse_args()
    options = (
        args.option
        if args.option is not None
        else ["timing={target_rel_ci: 0.01, min_s: 3, max_s: 6, max_repeats: 100000}"]
    )
    with tempfile.TemporaryDirectory(prefix="ac-bench-") as tmp:
        tmp = Path(tmp)
        artifact = args.artifact or make_artifact(args.backend, tmp / "artifact")
        print(
            f"1. the same artifact ({artifact.name}, {args.backend}/{args.device}) in {args.runs} processes:"
        )
        spread = reproducibility(artifact, args.backend, args.device, args.runs, options)
        print(f"2. latency cache: two studies over the same {args.trials} plans, one shared cache file:")
        hits = cache_across_studies(tmp, args.trials)
    ok = spread <= 0.03 and hits == args.trials
    print(
        "OK" if ok else "FAILED: " + ("spread above 3%" if spread > 0.03 else "the second study re-measured")
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
