"""Trials per hour of 2 concurrent ``autocompress worker`` processes vs 1, on the same study, in one run.

    python benchmarks/workers.py [--trials 4] [--width 64] [--epochs 4]   (the quickstart model and fine-tune)

Alternating phases on the same study (same journal storage, same run folder): one worker runs
``--trials`` trials, then two workers together run 2x that many, repeated ``--rounds`` times so that the
load of other processes on the machine falls on both alike. Throughput is measured from the trials'
own start / completion times in the storage (process start-up and the one-off teacher and baseline are
excluded). Each worker fine-tunes with 1 torch thread; timing holds the per-device lock, so the timed
part of a trial is serialized across the workers, as it must be. Prints the ratio (target >= 1.6x).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import optuna
import yaml
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

ROOT = Path(__file__).resolve().parents[1]


def _worker(study_file: Path, n: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "autocompress.cli", "worker", str(study_file), "--n-trials", str(n)]
    return subprocess.Popen(cmd, env=env, stdout=log.open("a"), stderr=subprocess.STDOUT, cwd=ROOT)


def _throughput(trials: list[optuna.trial.FrozenTrial]) -> tuple[float, float]:
    """(trials per hour, span in seconds) from the first start to the last completion."""
    t0 = min(t.datetime_start for t in trials)
    t1 = max(t.datetime_complete for t in trials)
    span = (t1 - t0).total_seconds()
    return len(trials) / span * 3600, span


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=4, help="trials per worker in each phase")
    ap.add_argument("--rounds", type=int, default=2, help="alternations of the 1-worker and 2-worker phases")
    ap.add_argument("--width", type=int, default=64, help="digits CNN width (64 = the quickstart model)")
    ap.add_argument("--epochs", type=int, default=4, help="fine-tune epochs per trial (4 = the quickstart)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ac-bench-workers-"))
    journal = tmp / "journal.log"
    study_file = tmp / "bench.yaml"
    study_file.write_text(
        yaml.safe_dump(
            {
                "name": "bench",
                "task": {"name": "digits", "options": {"width": args.width}},
                "space": {"file": str(ROOT / "autocompress/search_spaces/default.yaml")},
                "finetune": {"epochs": args.epochs, "threads": 1},
                "sampler": {"name": "random"},
                "trials": {"n": 1, "warm_start": []},
                "storage": f"journal://{journal}",
                "output": str(tmp / "run"),
            }
        )
    )
    print(f"load average before: {os.getloadavg()[0]:.2f} (other processes share these cores)")
    storage = JournalStorage(JournalFileBackend(str(journal)))
    one, two, span1, span2, target = [], [], 0.0, 0.0, 0
    for r in range(args.rounds):  # alternate the phases so that outside load hits both alike
        for n_workers in (1, 2):
            target += n_workers * args.trials
            print(f"round {r + 1}: {n_workers} worker(s) until {target} trials", flush=True)
            procs = [_worker(study_file, target, tmp / f"w{r}-{n_workers}-{i}.log") for i in range(n_workers)]
            if any(p.wait() != 0 for p in procs):
                print((tmp / f"w{r}-{n_workers}-0.log").read_text()[-3000:])
                return 1
            study = optuna.load_study(study_name="bench", storage=storage)
            done = sorted(study.get_trials(states=(TrialState.COMPLETE,)), key=lambda t: t.datetime_complete)
            phase = done[target - n_workers * args.trials : target]
            span = _throughput(phase)[1]
            (one if n_workers == 1 else two).extend(phase)
            span1, span2 = (span1 + span, span2) if n_workers == 1 else (span1, span2 + span)
    tph1, tph2 = len(one) / span1 * 3600, len(two) / span2 * 3600
    secs = [t.user_attrs["seconds"] for t in one + two]
    share = sum(s["measure"] for s in secs) / sum(s["total"] for s in secs)
    print(f"1 worker : {len(one)} trials in {span1:.1f} s = {tph1:.0f} trials/h")
    print(f"2 workers: {len(two)} trials in {span2:.1f} s = {tph2:.0f} trials/h")
    for label, trials in (("1 worker ", one), ("2 workers", two)):
        parts = {
            k: sum(t.user_attrs["seconds"][k] for t in trials) / len(trials) for k in ("finetune", "measure")
        }
        print(
            f"{label}: mean fine-tune {parts['finetune']:.2f} s, mean timing {parts['measure']:.2f} s per trial"
        )
    print(
        f"timed (device-locked) share of a trial: {share:.0%}; load average after: {os.getloadavg()[0]:.2f}"
    )
    ratio = tph2 / tph1
    print(f"ratio 2 workers / 1 worker: {ratio:.2f}x (target >= 1.6x)")
    return 0 if ratio >= 1.6 else 1


if __name__ == "__main__":
    sys.exit(main())
