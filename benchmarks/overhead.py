"""The framework's own overhead: the share of a trial's wall time spent outside fine-tuning,
evaluation and latency timing, and the sampler's time per trial.

Runs the quickstart study (or another) into a fresh run folder, with its sampler wrapped in a
stopwatch, then splits every completed trial's wall time (from its ``ask`` to the next trial's ``ask``,
so sampling, storage writes, progress and trials.csv are all inside it) into:

- useful work: the fine-tuning loop, the artifact's evaluation on the test split, latency timing;
- overhead: technique set-up (BN folding, pruning, factorization, fake quantization), lowering to
  the artifact (ONNX export + quantization), the sampler, and bookkeeping (storage, trial folder,
  progress, trials.csv).

Exits 1 when the median overhead share is above ``--limit`` (10%).

Usage::

    python benchmarks/overhead.py                     # quickstart, 20 trials
    python benchmarks/overhead.py --trials 40 studies/mnist1d_cnn.yaml
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

import optuna

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class TimedSampler(optuna.samplers.BaseSampler):
    """Delegates to a sampler and adds up the seconds it spends, per trial number."""

    def __init__(self, inner: optuna.samplers.BaseSampler):
        self.inner = inner
        self.seconds: dict[int, float] = {}

    def _timed(self, trial, fn, *args):
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.seconds[trial.number] = self.seconds.get(trial.number, 0.0) + time.perf_counter() - t0

    def infer_relative_search_space(self, study, trial):
        return self._timed(trial, self.inner.infer_relative_search_space, study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._timed(trial, self.inner.sample_relative, study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._timed(trial, self.inner.sample_independent, study, trial, param_name, param_distribution)

    def before_trial(self, study, trial):
        return self._timed(trial, self.inner.before_trial, study, trial)

    def after_trial(self, study, trial, state, values):
        return self._timed(trial, self.inner.after_trial, study, trial, state, values)

    def reseed_rng(self):
        self.inner.reseed_rng()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("study", nargs="?", default="studies/quickstart.yaml")
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--limit", type=float, default=0.10, help="largest acceptable median overhead share")
    p.add_argument("--keep", action="store_true", help="keep the temporary run folder")
    args = p.parse_args()

    from _shared import fresh_run

    from autocompress.search import run_setup, runner

    timed: list[TimedSampler] = []
    make_sampler = run_setup.make_sampler

    def make_timed(*a, **kw):
        timed.append(TimedSampler(make_sampler(*a, **kw)))
        return timed[-1]

    run_setup.make_sampler = make_timed  # instrumentation only: the study runs unchanged otherwise

    cfg, folder = fresh_run(args.study, "ac-overhead-")
    t0 = time.perf_counter()
    summary = runner.run_study(cfg, n_trials=args.trials, log=lambda line: None)
    wall = time.perf_counter() - t0
    trials = sorted(summary.study.get_trials(deepcopy=False), key=lambda t: t.number)
    sampler_s = timed[-1].seconds

    rows = []
    for t, nxt in zip(trials, trials[1:], strict=False):
        if t.state != optuna.trial.TrialState.COMPLETE:
            continue
        s = t.user_attrs["seconds"]
        trial_wall = (nxt.datetime_start - t.datetime_start).total_seconds()
        useful = s["train"] + s["evaluate"] + s["measure"]
        rows.append(
            {
                "wall": trial_wall,
                "train": s["train"],
                "evaluate": s["evaluate"],
                "measure": s["measure"],
                "setup": s["finetune"] - s["train"],
                "lower": s["lower"],
                "sampler": sampler_s.get(t.number, 0.0),
                "bookkeeping": trial_wall - s["total"] - sampler_s.get(t.number, 0.0),
                "overhead": trial_wall - useful,
            }
        )
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)
    if not rows:
        print("no completed trial to analyse")
        return 1

    def med(key: str) -> float:
        return statistics.median(r[key] for r in rows)

    total_wall = sum(r["wall"] for r in rows)
    print(f"{args.study}: {len(rows)} completed trials analysed ({summary.completed} run, {wall:.0f} s wall)")
    print(f"{'part':<34}{'median s/trial':>15}{'share of wall':>15}")
    parts = [
        ("fine-tuning loop", "train"),
        ("evaluation of the artifact", "evaluate"),
        ("latency timing (with baseline)", "measure"),
        ("technique set-up (overhead)", "setup"),
        ("lowering: export+quant (overhead)", "lower"),
        ("sampler (overhead)", "sampler"),
        ("bookkeeping (overhead)", "bookkeeping"),
    ]
    for label, key in parts:
        print(f"{label:<34}{med(key):>15.3f}{sum(r[key] for r in rows) / total_wall:>15.1%}")
    share = statistics.median(r["overhead"] / r["wall"] for r in rows)
    print(f"{'trial wall time':<34}{med('wall'):>15.3f}{1:>15.0%}")
    print(f"framework overhead: median {share:.1%} of a trial's wall time (limit {args.limit:.0%})")
    print(
        f"sampler time per trial: median {med('sampler') * 1e3:.1f} ms, max {max(r['sampler'] for r in rows) * 1e3:.1f} ms"
    )
    return 0 if share <= args.limit else 1


if __name__ == "__main__":
    sys.exit(main())
