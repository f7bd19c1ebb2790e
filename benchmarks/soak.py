"""Hours hands-off: 2 ``autocompress worker`` processes on one PostgreSQL study, one of them SIGKILLed
and restarted every ~15 minutes, for ``--hours`` of wall time (not in CI).

    python benchmarks/soak.py [--hours 2] [--kill-every-min 15] [--storage postgresql://...]

Without ``--storage`` a throwaway PostgreSQL server is started on 127.0.0.1 (the distribution's binaries,
as in the tests: ``tests/pg_server.py``). Worker A is never killed; worker B is killed at a random moment
within each interval (uniform in [0.5, 1.5] x ``--kill-every-min``) and started again at once. At the end
both are killed, and one more worker finishes exactly the trials they left running (their retries), then
writes the report. Prints: trials completed, kills (and how many landed mid-trial), trials retried, lost
(a killed trial without a completed retry, a completed trial without its folder, a folder without a
completed trial, a plan counted twice; must be 0, else the exit status is 1), and the memory trend of each
worker (resident memory of the worker and its child processes, sampled every ``--sample-s`` seconds).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import yaml
from optuna.trial import TrialState

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # pg_server: the tests' throwaway PostgreSQL server


def _rss_mb(pid: int) -> float | None:
    """Resident memory of ``pid`` and its descendants (MB), None once it is gone."""
    total, todo, seen = 0, [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            if p == pid:
                return None
    return total / 1024


class Worker:
    """One ``autocompress worker`` process at a time under a name; restarted after each kill."""

    def __init__(self, name: str, study_file: Path, log_dir: Path, env: dict):
        self.name, self.study_file, self.log_dir, self.env = name, study_file, log_dir, env
        self.proc: subprocess.Popen | None = None
        self.incarnations: list[list[tuple[float, float]]] = []  # per process: (time since soak start, MB)
        self.exits: list[int] = []

    def start(self, extra: tuple[str, ...] = ()) -> None:
        log = (self.log_dir / f"{self.name}.log").open("a")
        cmd = [sys.executable, "-m", "autocompress.cli", "worker", str(self.study_file), *extra]
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        self.incarnations.append([])

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def sample(self, t: float) -> None:
        if self.proc is not None and self.proc.poll() is None:
            mb = _rss_mb(self.proc.pid)
            if mb is not None:
                self.incarnations[-1].append((t, mb))


def _study_file(tmp: Path, url: str, args) -> Path:
    data = {
        "name": "soak",
        "task": {"name": "digits", "options": {"width": args.width}},
        "space": {"file": str(ROOT / "autocompress/search_spaces/default.yaml")},
        "finetune": {"epochs": args.epochs, "threads": 1},
        "sampler": {"name": "tpe"},
        "trials": {"n": 100_000, "warm_start": []},  # the wall time ends the soak, not the count
        "storage": url,
        "workers": {"heartbeat_interval_s": 2, "grace_period_s": 6, "max_retry": 3},
        "output": str(tmp / "run"),
    }
    path = tmp / "soak.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _running(study: optuna.Study) -> set[int]:
    return {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}


def _account(study: optuna.Study, run: Path) -> dict:
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    killed = [t for t in trials if t.state == TrialState.FAIL and "fail_reason" not in t.user_attrs]
    failed_itself = [t for t in trials if t.state == TrialState.FAIL and "fail_reason" in t.user_attrs]
    recovered_by: dict[int, list[int]] = {}
    for t in complete:
        for k in t.system_attrs.get("retry_history", []):
            recovered_by.setdefault(k, []).append(t.number)
    unrecovered = [t.number for t in killed if t.number not in recovered_by]
    twice = [k for k, copies in recovered_by.items() if len(copies) > 1]
    folders = {p.name for p in (run / "trials").iterdir()} if (run / "trials").is_dir() else set()
    without_folder = [t.number for t in complete if not (run / t.user_attrs.get("artifact", "-")).is_file()]
    stray = sorted(folders - {f"{t.number:05d}" for t in complete})
    return {
        "completed": len(complete),
        "killed": [t.number for t in killed],
        "retried": sum(1 for t in complete if t.system_attrs.get("retry_history")),
        "failed_itself": len(failed_itself),
        "unrecovered": unrecovered,
        "twice": twice,
        "without_folder": without_folder,
        "stray": stray,
        "left": [t.number for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)],
    }


def _trend(points: list[tuple[float, float]]) -> str:
    """RSS at 10%, 50% and the end of a process's life, and its slope over the second half (steady state:
    the set-up and the first trials, which fill the allocator's and the libraries' caches, are past)."""
    if len(points) < 4:
        return "too short to sample"
    n = len(points)
    at = {f: points[min(n - 1, int(f * (n - 1)))] for f in (0.1, 0.5, 1.0)}
    (t_half, mb_half), (t_end, mb_end) = at[0.5], at[1.0]
    slope = (mb_end - mb_half) / ((t_end - t_half) / 3600) if t_end > t_half else float("nan")
    return (
        f"{at[0.1][1]:.0f} MB at 10%, {mb_half:.0f} at 50%, {mb_end:.0f} at the end "
        f"(peak {max(mb for _, mb in points):.0f}); second half: {mb_end - mb_half:+.0f} MB ({slope:+.0f} MB/h)"
    )


def _terminate(_signum, _frame):
    raise KeyboardInterrupt  # SIGTERM: the same clean-up as Ctrl-C (workers killed, server stopped)


def main() -> int:
    signal.signal(signal.SIGTERM, _terminate)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hours", type=float, default=2.0, help="wall time of the soak")
    ap.add_argument("--kill-every-min", type=float, default=15.0, help="mean interval between kills")
    ap.add_argument("--storage", help="PostgreSQL URL (default: a throwaway server on 127.0.0.1)")
    ap.add_argument("--width", type=int, default=32, help="digits CNN width")
    ap.add_argument("--epochs", type=int, default=2, help="fine-tune epochs per trial")
    ap.add_argument("--sample-s", type=float, default=10.0, help="memory sampling period")
    ap.add_argument("--seed", type=int, default=None, help="seed of the kill moments (default: the clock)")
    ap.add_argument("--keep", action="store_true", help="keep the run folder (and the server's data)")
    args = ap.parse_args()
    seed = int(time.time()) if args.seed is None else args.seed
    rng = random.Random(seed)
    tmp = Path(tempfile.mkdtemp(prefix="ac-soak-"))
    url = args.storage
    if url is not None:
        return _soak(args, rng, seed, tmp, url)
    from pg_server import new_database, start_server

    server = start_server()
    try:
        return _soak(args, rng, seed, tmp, new_database(server.url))
    finally:
        if not args.keep:
            server.cleanup()
        else:
            print(f"PostgreSQL left running: {server.url} (data in {server.data})")


def _soak(args, rng: random.Random, seed: int, tmp: Path, url: str) -> int:
    study_file = _study_file(tmp, url, args)
    run = tmp / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("AUTOCOMPRESS_CRASH_AT", None)
    env.pop("AUTOCOMPRESS_FAULT", None)
    a, b = Worker("A", study_file, tmp, env), Worker("B", study_file, tmp, env)
    shown = url.split("@")[-1]
    print(f"soak: {args.hours:g} h, 2 workers on PostgreSQL ({shown}), worker B killed every "
          f"~{args.kill_every_min:g} min (seed {seed}); logs and run folder in {tmp}", flush=True)  # fmt: skip
    t0 = time.monotonic()
    end = t0 + args.hours * 3600
    kills: list[dict] = []
    unexpected: list[str] = []
    try:
        a.start()
        time.sleep(5)  # A trains the teacher and creates the study; B waits on the set-up lock meanwhile
        b.start()
        next_kill = time.monotonic() + rng.uniform(0.5, 1.5) * args.kill_every_min * 60
        next_sample = time.monotonic()
        study = None
        while time.monotonic() < end:
            time.sleep(0.5)
            now = time.monotonic()
            if now >= next_sample:
                for w in (a, b):
                    w.sample(now - t0)
                next_sample = now + args.sample_s
            for w in (a, b):
                if w.proc.poll() is not None:  # a worker must not exit by itself
                    unexpected.append(
                        f"worker {w.name} exited ({w.proc.returncode}) at {(now - t0) / 60:.1f} min"
                    )
                    print(unexpected[-1], flush=True)
                    w.exits.append(w.proc.returncode)
                    w.start()
            if now >= next_kill and now < end - 60:
                if study is None:
                    study = optuna.load_study(study_name="soak", storage=url)
                b.kill()
                running = sorted(_running(study))  # A's and (if the kill landed mid-trial) B's
                kills.append({"at_min": (now - t0) / 60, "running": running})
                done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
                print(f"[{(now - t0) / 60:6.1f} min] killed worker B (trials running then: {running}); "
                      f"{done} trials completed so far; restarted", flush=True)  # fmt: skip
                b.start()
                next_kill = now + rng.uniform(0.5, 1.5) * args.kill_every_min * 60
        # the end: both die as a kill would have it, then one worker finishes what they left running
        study = study or optuna.load_study(study_name="soak", storage=url)
        for w in (a, b):
            w.kill()
        left = _running(study)
        done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
        print(f"[{(time.monotonic() - t0) / 60:6.1f} min] stopped both workers ({done} completed, running then: "
              f"{sorted(left)}); a last worker finishes their retries", flush=True)  # fmt: skip
        drain = Worker("drain", study_file, tmp, env)
        drain.start(("--n-trials", str(done + len(left))))
        rc = drain.proc.wait(timeout=3600)
        if rc != 0:
            unexpected.append(f"the last worker exited {rc}")
    finally:
        for w in (a, b):
            w.kill()
    study = optuna.load_study(study_name="soak", storage=url)
    acc = _account(study, run)
    hours = (time.monotonic() - t0) / 3600
    lost = len(acc["unrecovered"]) + len(acc["twice"]) + len(acc["without_folder"]) + len(acc["stray"])
    # a kill landed mid-trial when one of the trials running at that moment was failed by its heartbeat
    landed = sum(1 for k in kills if set(k["running"]) & set(acc["killed"]))
    print()
    print(
        f"wall time: {hours:.2f} h; kills of worker B: {len(kills)} ({landed} mid-trial), plus both at the end"
    )
    print(f"trials completed: {acc['completed']} ({acc['completed'] / hours:.0f}/h)")
    print(
        f"trials retried: {acc['retried']} (killed mid-trial: {len(acc['killed'])}, each failed by its stale "
        f"heartbeat and queued again); trials that failed by themselves: {acc['failed_itself']}"
    )
    print(
        f"lost: {lost} (killed without a completed retry: {acc['unrecovered']}; counted twice: {acc['twice']}; "
        f"completed without a folder: {acc['without_folder']}; folders without a completed trial: {acc['stray']})"
    )
    if acc["left"]:
        print(f"left running or waiting: {acc['left']}")
    print("memory (resident, worker + its child processes):")
    print(f"  worker A (never killed): {_trend(a.incarnations[0]) if a.incarnations else 'not sampled'}")
    lives = [p for p in b.incarnations if len(p) >= 2]
    if lives:
        ends = ", ".join(f"{p[-1][1]:.0f}" for p in lives)
        print(f"  worker B ({len(b.incarnations)} processes, each killed): RSS when killed {ends} MB")
    if kills and not landed:
        unexpected.append("no kill of worker B landed mid-trial: nothing was tested")
    for line in unexpected:
        print(f"unexpected: {line}")
    ok = lost == 0 and not unexpected and not acc["left"]
    print("OK" if ok else "FAILED")
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
