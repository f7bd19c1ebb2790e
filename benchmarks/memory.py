"""Memory over a long run: peak and resident memory after 10 and after 50 trials must stay flat.

Runs the quickstart study (or another) for ``--trials`` trials (default 50) into a fresh run folder
(the teacher is copied from the study's own run folder when it has one: training it is not a trial)
and, after every trial, reads the process's resident memory (VmRSS), its peak (VmHWM) and the
number of live ``torch.nn.Module`` and ONNX Runtime session objects created since the run was set
up (what was alive then, teacher included, is frozen out of the collector's view: see
``autocompress.search.run_setup.frozen_heap``). Every trial builds a student, an optimizer, an ONNX
artifact and an inference session; if any of them outlived its trial, the counts and the memory
would climb with the trial number.

Prints the figures at trials 1, 10, 20, ... and the resident memory's trend from trial 10 on (least
squares, MB per trial). Exits 1 when the peak after the last trial is more than ``--max-growth`` (5%)
above the peak after trial 10, when the trend would add more than that over the same trials, or when
module or session counts grew. The peak can step up once when a trial's plan allocates more than
any before it (a wider layer, a bigger factorization); a leak shows as a trend.

A study whose trials take minutes can be made cheaper per trial without touching the model or the
compression it searches: ``--eval-samples N`` scores each trial on N eval samples (``trials.eval_samples``;
the front's final re-scoring still reads all of them), ``--timing-max-s S`` caps the timed rounds of each
latency measurement at S seconds (``backend.options.timing.max_s``), ``--calibration-samples N`` feeds N
calibration samples to static quantization (``task.options.calibration_samples``, for tasks that take
it). Every change is printed with the figures.

Usage::

    python benchmarks/memory.py                       # quickstart, 50 trials (about 3 minutes)
    python benchmarks/memory.py studies/mnist1d_cnn.yaml --trials 30
    python benchmarks/memory.py studies/bert_encoder.yaml --trials 50 --eval-samples 16 --timing-max-s 0.5
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def memory_mb() -> tuple[float, float]:
    """(resident, peak resident) of this process in MB."""
    fields = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) / 1024
    except OSError:
        pass
    peak = fields.get("VmHWM", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return fields.get("VmRSS", float("nan")), peak


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("study", nargs="?", default="studies/quickstart.yaml")
    p.add_argument("--trials", type=int, default=50)
    p.add_argument(
        "--max-growth", type=float, default=0.05, help="largest acceptable peak growth after trial 10"
    )
    p.add_argument(
        "--eval-samples", type=int, help="trials.eval_samples for the search (default: the study's)"
    )
    p.add_argument("--timing-max-s", type=float, help="backend.options.timing.max_s (default: the backend's)")
    p.add_argument(
        "--calibration-samples", type=int, help="task.options.calibration_samples (default: the task's)"
    )
    p.add_argument("--progress", action="store_true", help="one line per trial on stderr")
    args = p.parse_args()
    if args.trials < 11:
        p.error("--trials must be above 10 (growth is measured from trial 10)")

    from _shared import fresh_run

    from autocompress.config import load_config

    study_cfg = load_config(ROOT / args.study)
    overrides: dict = {}
    if args.eval_samples is not None:
        overrides["trials.eval_samples"] = args.eval_samples
    if args.timing_max_s is not None:
        timing = dict(study_cfg.backend.options.get("timing", {}), max_s=args.timing_max_s)
        overrides["backend.options"] = dict(study_cfg.backend.options, timing=timing)
    if args.calibration_samples is not None:
        overrides["task.options"] = dict(study_cfg.task.options, calibration_samples=args.calibration_samples)

    from autocompress.search import runner
    from autocompress.testing import live_objects

    samples: list[dict] = []
    execute = runner.execute_trial
    t0 = time.perf_counter()

    def measured(ctx, study, trial, fidelity=None):
        out = execute(ctx, study, trial, fidelity)
        rss, peak = memory_mb()
        modules, sessions = live_objects()
        samples.append(
            {
                "n": len(samples) + 1,
                "state": out[0].name,
                "rss": rss,
                "peak": peak,
                "modules": modules,
                "sessions": sessions,
                "s": time.perf_counter() - t0,
            }
        )
        if args.progress:
            print(
                f"trial {len(samples)}: {out[0].name} rss {rss:.0f} MB peak {peak:.0f} MB modules {modules} "
                f"sessions {sessions} at {samples[-1]['s']:.0f}s",
                file=sys.stderr,
                flush=True,
            )
        return out

    runner.execute_trial = measured  # instrumentation only: the study runs unchanged otherwise

    cfg, folder = fresh_run(args.study, "ac-memory-", overrides)
    try:
        runner.run_study(cfg, n_trials=args.trials, log=lambda line: None)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if len(samples) < args.trials:
        print(f"only {len(samples)} trials ran (failures stop a study after trials.max_failures)")
        return 1

    print(f"{args.study}: {len(samples)} trials, one process, {time.perf_counter() - t0:.0f} s")
    shown = {
        "trials.eval_samples": (study_cfg.trials.eval_samples, cfg.trials.eval_samples),
        "backend.options": (study_cfg.backend.options, cfg.backend.options),
        "task.options": (study_cfg.task.options, cfg.task.options),
    }
    changes = [f"{k}: {a!r} -> {b!r}" for k, (a, b) in shown.items() if a != b]
    print(
        "changed from the study file (model and search space unchanged): " + "; ".join(changes)
        if changes
        else "study file as shipped (only output and trials.timeout_s changed)"
    )
    print(
        f"{'after trial':>11}{'state':>10}{'RSS MB':>9}{'peak MB':>9}{'modules':>9}{'sessions':>10}{'elapsed':>9}"
    )
    for s in samples:
        if s["n"] in (1, len(samples)) or s["n"] % 10 == 0:
            print(
                f"{s['n']:>11}{s['state']:>10}{s['rss']:>9.1f}{s['peak']:>9.1f}{s['modules']:>9}"
                f"{s['sessions']:>10}{s['s']:>8.0f}s"
            )
    at10, last = samples[9], samples[-1]
    growth = last["peak"] / at10["peak"] - 1
    tail = samples[9:]
    slope = float(np.polyfit([s["n"] for s in tail], [s["rss"] for s in tail], 1)[0])
    trend = slope * (last["n"] - at10["n"]) / at10["rss"]
    ok = (
        growth <= args.max_growth
        and trend <= args.max_growth
        and last["modules"] <= at10["modules"]
        and last["sessions"] <= at10["sessions"]
    )
    print(
        f"peak memory after trial 10: {at10['peak']:.1f} MB, after trial {last['n']}: {last['peak']:.1f} MB "
        f"({growth:+.1%}, limit +{args.max_growth:.0%}); resident {at10['rss']:.1f} -> {last['rss']:.1f} MB, "
        f"trend {slope:+.2f} MB/trial ({trend:+.1%} over trials 10-{last['n']}); "
        f"live modules {at10['modules']} -> {last['modules']}, sessions {at10['sessions']} -> {last['sessions']}: "
        f"{'flat' if ok else 'GROWING'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
