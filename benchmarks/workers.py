"""Trials per hour of 2 concurrent ``autocompress worker`` processes vs 1, on the same study, in one run.

    python benchmarks/workers.py [--trials 6] [--width 16] [--epochs 3]

Phase 1 runs one worker until the study has ``--trials`` completed trials; phase 2 runs two workers
together on the same study (same journal storage, same run folder) until it has 3x that many, so each
phase completes about the same amount of work per worker. Throughput is measured from the trials'
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


def _phase_split(study: optuna.Study, n1: int) -> tuple[list, list]:
    done = sorted(study.get_trials(states=(TrialState.COMPLETE,)), key=lambda t: t.datetime_start)
    return done[:n1], done[n1:]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=6, help="trials of the single-worker phase")
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ac-bench-workers-"))
    journal = tmp / "journal.log"
    study_file = tmp / "bench.yaml"
    study_file.write_text(
        yaml.safe_dump(
            {
                "name": "bench",
                "task": {"name": "digits", "options": {"width": args.width}},
                "space": {"file": str(ROOT / "search_spaces/default.yaml")},
                "finetune": {"epochs": args.epochs, "threads": 1},
                "sampler": {"name": "random"},
                "trials": {"n": args.trials, "warm_start": []},
                "storage": f"journal://{journal}",
                "output": str(tmp / "run"),
            }
        )
    )
    n1, n2 = args.trials, 3 * args.trials
    print(f"phase 1: one worker, {n1} trials (run folder {tmp})", flush=True)
    if _worker(study_file, n1, tmp / "w0.log").wait() != 0:
        print((tmp / "w0.log").read_text()[-3000:])
        return 1
    print(f"phase 2: two workers together, {n2 - n1} more trials", flush=True)
    procs = [_worker(study_file, n2, tmp / f"w{i}.log") for i in (1, 2)]
    if any(p.wait() != 0 for p in procs):
        print((tmp / "w1.log").read_text()[-3000:])
        return 1
    study = optuna.load_study(study_name="bench", storage=JournalStorage(JournalFileBackend(str(journal))))
    one, two = _phase_split(study, n1)
    tph1, span1 = _throughput(one)
    tph2, span2 = _throughput(two)
    secs = [t.user_attrs["seconds"] for t in one + two]
    share = sum(s["measure"] for s in secs) / sum(s["total"] for s in secs)
    print(f"1 worker : {len(one)} trials in {span1:.1f} s = {tph1:.0f} trials/h")
    print(f"2 workers: {len(two)} trials in {span2:.1f} s = {tph2:.0f} trials/h")
    print(f"timed (device-locked) share of a trial: {share:.0%}")
    ratio = tph2 / tph1
    print(f"ratio 2 workers / 1 worker: {ratio:.2f}x (target >= 1.6x)")
    return 0 if ratio >= 1.6 else 1


if __name__ == "__main__":
    sys.exit(main())
