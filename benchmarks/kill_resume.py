"""Kill / resume on a big model: ``autocompress run`` SIGKILLed in each phase of its work, then resumed.

Runs ``autocompress run`` on a study (default ``studies/bert_encoder.yaml``) in a subprocess, into a
fresh folder, ``--kills`` times (default 5) with one kill each, landing in a phase chosen in random order
from: ``set-up`` (this script SIGKILLs the process at a random moment before its first trial is asked:
loading the checkpoint, the teacher's reference outputs, the baseline's export and timing, the study's
creation or recovery), and inside a trial, through the fault points of :mod:`autocompress.faults`
(``AUTOCOMPRESS_CRASH_AT``, the process SIGKILLs itself): ``fine-tune`` (second optimizer step),
``export`` (inside ``torch.onnx.export``), ``timing`` (0.1 s into the latency measurement), ``folder
write`` (the trial's folder half written in its temp folder). In-trial kills land on the first, second or
third trial of that run (random), so finished trials exist in the storage when later kills land. Then the
same command runs once more, unkilled, to completion.

Prints each kill (phase, how, when, what the storage held after it), then: completed trials in the
storage vs trial folders (must be equal), duplicates (a plan completed twice, two trials on one folder,
more completed trials than ``trials.n``: must be 0), front entries present (each front trial has its
whole folder and its ``pareto/`` copy), lost (a trial completed before a kill that is not completed, or
has no folder, at the end: must be 0), interrupted trials retried. Exits 1 when any of these fails or a
kill did not land.

The study file's model and search space are used unchanged. Changed, and printed: ``trials.n``
(``--trials``, default 8), ``finetune.steps`` (``--finetune-steps``, default 8: there is a fine-tune
phase to kill in; the study as shipped does post-training quantization only), ``trials.keep: all``
(every completed trial keeps its folder, so folders and storage can be compared one to one; the shipped
``pareto`` deletes dominated ones), ``trials.timeout_s: null``, the output folder, and optionally
``--eval-samples`` (``trials.eval_samples``), ``--timing-max-s`` (``backend.options.timing.max_s``),
``--finetune-batch-size`` (``finetune.batch_size``), ``--calibration-samples``
(``task.options.calibration_samples``) to shorten trials and ``--trial-timeout-s``
(``trials.trial_timeout_s``) for a loaded machine.

Usage::

    python benchmarks/kill_resume.py --study studies/bert_encoder.yaml --kills 5
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TRIAL_FILES = {"model.onnx", "plan.json", "metrics.json", "weights.safetensors"}
IN_TRIAL = {
    "fine-tune": "finetune",
    "export": "export",
    "timing": "measure",
    "folder write": "artifact_write",
}
PHASES = ("set-up", *IN_TRIAL)


def study_file(args, folder: Path) -> tuple[Path, dict, dict]:
    """The study file this benchmark runs (absolute paths, the changes above) and the changes made."""
    src = ROOT / args.study
    data = yaml.safe_load(src.read_text())
    before = json.loads(json.dumps(data))
    data["output"] = str(folder / "run")
    opts = data.setdefault("task", {}).setdefault("options", {})
    if "checkpoint" in opts and not Path(opts["checkpoint"]).is_absolute():
        opts["checkpoint"] = str(ROOT / opts["checkpoint"])
    space = data.setdefault("space", {})
    if "file" in space and not Path(space["file"]).is_absolute():
        space["file"] = str(ROOT / space["file"])
    trials = data.setdefault("trials", {})
    trials.update({"n": args.trials, "keep": "all", "timeout_s": None})
    data.setdefault("finetune", {})["steps"] = args.finetune_steps
    if args.eval_samples is not None:
        trials["eval_samples"] = args.eval_samples
    if args.finetune_batch_size is not None:
        data["finetune"]["batch_size"] = args.finetune_batch_size
    if args.calibration_samples is not None:
        opts["calibration_samples"] = args.calibration_samples
    if args.trial_timeout_s is not None:
        trials["trial_timeout_s"] = args.trial_timeout_s
    if args.timing_max_s is not None:
        backend = data.setdefault("backend", {})
        backend.setdefault("options", {}).setdefault("timing", {})["max_s"] = args.timing_max_s
    path = folder / Path(args.study).name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path, before, data


def changes(before: dict, after: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(before) | set(after)):
        a, b = before.get(key), after.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += changes(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def storage_rows(run: Path) -> list[tuple[int, str]]:
    """(number, state) of every trial in the run's SQLite storage, read without Optuna (safe while a
    process writes it); [] before the study exists."""
    db = run / "study.db"
    if not db.exists():
        return []
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as con:
            return list(con.execute("select number, state from trials order by number"))
    except sqlite3.Error:
        return []


def launch(study: Path, log: Path, crash: str | None) -> subprocess.Popen:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    for key in ("AUTOCOMPRESS_CRASH_AT", "AUTOCOMPRESS_FAULT"):
        env.pop(key, None)
    if crash:
        env["AUTOCOMPRESS_CRASH_AT"] = crash
    return subprocess.Popen(
        [sys.executable, "-m", "autocompress.cli", "run", str(study)],
        cwd=ROOT,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )


def kill_in_setup(proc: subprocess.Popen, run: Path, delay_s: float) -> tuple[bool, str]:
    """SIGKILL ``proc`` ``delay_s`` after its start if it has not asked a trial by then."""
    before = len(storage_rows(run))
    t0 = time.monotonic()
    while time.monotonic() - t0 < delay_s:
        if proc.poll() is not None:
            return False, f"the run ended ({proc.returncode}) before {delay_s:.0f} s"
        time.sleep(0.2)
    rows = storage_rows(run)
    running = [n for n, s in rows if s == "RUNNING"]
    if len(rows) > before and running:
        return False, f"trial {running} was already running at {delay_s:.0f} s"
    proc.send_signal(signal.SIGKILL)
    return True, f"SIGKILL from this script {delay_s:.1f} s after start"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--study", default="studies/bert_encoder.yaml")
    p.add_argument("--kills", type=int, default=5)
    p.add_argument("--trials", type=int, default=8, help="trials.n")
    p.add_argument("--finetune-steps", type=int, default=8, help="finetune.steps (>= 2: a phase to kill)")
    p.add_argument("--eval-samples", type=int, help="trials.eval_samples (default: the study's)")
    p.add_argument("--finetune-batch-size", type=int, help="finetune.batch_size (default: the study's)")
    p.add_argument(
        "--calibration-samples", type=int, help="task.options.calibration_samples (default: the task's)"
    )
    p.add_argument("--trial-timeout-s", type=float, help="trials.trial_timeout_s (default: the study's)")
    p.add_argument("--timing-max-s", type=float, help="backend.options.timing.max_s (default: the backend's)")
    p.add_argument(
        "--setup-kill-s", type=float, nargs=2, default=(3.0, 25.0), help="range of the set-up kill"
    )
    p.add_argument("--run-timeout-s", type=float, default=1800, help="limit of one run")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--keep", action="store_true", help="keep the run folder")
    args = p.parse_args()
    if args.finetune_steps < 2:
        p.error("--finetune-steps must be >= 2 (the fine-tune fault point is the second step)")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    rng = random.Random(seed)
    phases = list(PHASES) * (args.kills // len(PHASES) + 1)
    phases = phases[: args.kills]
    rng.shuffle(phases)

    folder = Path(tempfile.mkdtemp(prefix="ac-killresume-"))
    study, before, after = study_file(args, folder)
    run = folder / "run"
    t_start = time.monotonic()
    print(f"{args.study}: {args.kills} kills then a resume, seed {seed}, folder {folder}")
    print(
        "changed from the study file (model and search space unchanged): " + "; ".join(changes(before, after))
    )
    kills: list[dict] = []
    completed_before: set[int] = set()
    ok = True
    try:
        for i, phase in enumerate(phases, 1):
            rows = storage_rows(run)
            m = len(rows)
            done = sum(1 for _, s in rows if s == "COMPLETE")
            crash = None
            if phase != "set-up":
                # the r-th trial this run asks (numbers from m on), or a later one if that one failed early
                # (at most trials.n - 1 completed before any kill: a later kill still has a trial to land in)
                room = max(0, args.trials - done - 1)
                r = rng.randint(0, min(2, room))
                crash = ",".join(f"{IN_TRIAL[phase]}@{m + r + k}" for k in range(6))
            log = folder / f"run{i}.log"
            t0 = time.monotonic()
            proc = launch(study, log, crash)
            if phase == "set-up":
                landed, how = kill_in_setup(proc, run, rng.uniform(*args.setup_kill_s))
                proc.wait(timeout=60)
            else:
                try:
                    proc.wait(timeout=args.run_timeout_s)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                landed = proc.returncode == -signal.SIGKILL
                how = f"fault point {IN_TRIAL[phase]} (AUTOCOMPRESS_CRASH_AT={crash.split(',')[0]}...)"
            wall = time.monotonic() - t0
            rows = storage_rows(run)
            complete = {n for n, s in rows if s == "COMPLETE"}
            running = [n for n, s in rows if s == "RUNNING"]
            completed_before |= complete
            kills.append(
                {
                    "phase": phase,
                    "landed": landed and proc.returncode == -signal.SIGKILL,
                    "how": how,
                    "rc": proc.returncode,
                    "wall": wall,
                    "complete": len(complete),
                    "running": running,
                }
            )
            k = kills[-1]
            print(
                f"kill {i}: {phase:<12} {'landed' if k['landed'] else 'NOT LANDED'} (rc {k['rc']}, {how}) after "
                f"{wall:.0f} s; storage: {k['complete']} completed, left running {running or 'none'}",
                flush=True,
            )
            if not k["landed"]:
                print("  log tail:\n" + "\n".join(log.read_text().splitlines()[-15:]))
        t0 = time.monotonic()
        log = folder / "resume.log"
        proc = launch(study, log, None)
        try:
            rc = proc.wait(timeout=args.run_timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        text = log.read_text()
        print(f"resume: exit {rc} after {time.monotonic() - t0:.0f} s; its log says:")
        for line in text.splitlines():
            if "interrupted" in line or "trials completed" in line or line.startswith("error"):
                print(f"  {line}")
        if rc != 0:
            print("  log tail:\n" + "\n".join(text.splitlines()[-30:]))
            ok = False
        ok = report(run, args.trials, kills, completed_before, args.kills) and ok
        print(f"total wall time {time.monotonic() - t_start:.0f} s")
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


def report(run: Path, n: int, kills: list[dict], completed_before: set[int], n_kills: int) -> bool:
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = f"sqlite:///{run}/study.db"
    study = optuna.load_study(study_name=optuna.get_all_study_names(url)[0], storage=url)
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    by_number = {t.number: t for t in trials}
    left = [t.number for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    landed = [k for k in kills if k["landed"]]
    print(
        f"kills landed: {len(landed)}/{n_kills} ("
        + ", ".join(f"{k['phase']}" for k in landed)
        + f"); trials in storage: {len(trials)} ({len(complete)} completed, "
        f"{sum(t.state == TrialState.FAIL for t in trials)} failed, left running/waiting {left or 'none'})"
    )

    # folders: one whole folder per completed trial, nothing else (no half-written temp folder)
    trials_dir = run / "trials"
    names = sorted(p.name for p in trials_dir.iterdir()) if trials_dir.exists() else []
    debris = [x for x in names if x.startswith(".")] + [
        p.name for p in run.iterdir() if p.name.startswith(".")
    ]
    folders = {int(x) for x in names if x.isdigit()}
    whole = {k for k in folders if {f.name for f in (trials_dir / f"{k:05d}").iterdir()} == TRIAL_FILES}
    numbers = {t.number for t in complete}
    print(
        f"completed trials in storage: {len(complete)}; trial folders: {len(folders)} ({len(whole)} whole); "
        f"equal: {numbers == folders == whole}; half-written / temp folders: {debris or 'none'}"
    )
    if numbers != folders:
        print(f"  completed without folder {sorted(numbers - folders)}, folder without completed trial "
              f"{sorted(folders - numbers)}")  # fmt: skip

    # duplicates: a plan completed twice (a trial and its retry, at any depth), two trials on one folder
    def origin(t) -> int:
        seen = set()
        while "retry_of" in t.user_attrs and t.number not in seen:
            seen.add(t.number)
            t = by_number[t.user_attrs["retry_of"]]
        return t.number

    origins = [origin(t) for t in complete]
    artifacts = [t.user_attrs.get("artifact") for t in complete]
    dup_plans = len(origins) - len(set(origins))
    dup_folders = len(artifacts) - len(set(artifacts))
    over = max(0, len(complete) - n)
    duplicates = dup_plans + dup_folders + over
    print(
        f"duplicates: {duplicates} (plans completed twice {dup_plans}, trials sharing a folder {dup_folders}, "
        f"completed beyond trials.n = {n}: {over})"
    )

    # interrupted trials: each marked failed and its plan queued again, the copy completed
    interrupted = [t for t in trials if t.user_attrs.get("fail_category") == "interrupted"]
    retries = {t.user_attrs["retry_of"]: t for t in trials if "retry_of" in t.user_attrs}
    unretried = [t.number for t in interrupted if t.params and t.number not in retries]
    print(
        f"interrupted trials: {len(interrupted)} {[t.number for t in interrupted]}, retried with the same plan: "
        f"{sum(1 for t in interrupted if t.number in retries and retries[t.number].params == t.params)}, "
        f"not retried: {unretried or 'none'}"
    )

    # front: each front trial's folder whole, its pareto/ copy there, front.json listing exactly the front
    front = {t.number for t in study.best_trials}
    front_json = run / "pareto" / "front.json"
    exported = (
        {r["trial"] for r in json.loads(front_json.read_text())["front"]} if front_json.exists() else set()
    )
    missing = [k for k in sorted(front) if not _front_entry_ok(run, k, whole, exported)]
    print(
        f"front: {len(front)} trials {sorted(front)}, entries present (folder + pareto/ copy + front.json): "
        f"{len(front) - len(missing)}/{len(front)}; front.json matches the storage's front: {exported == front}"
    )

    # lost: completed before some kill, not completed (or without its folder) at the end
    lost = sorted(k for k in completed_before if k not in numbers or k not in whole)
    print(f"lost: {len(lost)} {lost} (of {len(completed_before)} trials completed before the last kill)")
    return (
        len(landed) == n_kills
        and len(complete) == n
        and numbers == folders == whole
        and not debris
        and duplicates == 0
        and not unretried
        and not missing
        and exported == front
        and bool(front)
        and not lost
        and not left
    )


def _front_entry_ok(run: Path, k: int, whole: set[int], exported: set[int]) -> bool:
    copy = run / "pareto" / f"trial-{k:05d}"
    return k in whole and k in exported and copy.is_dir() and {f.name for f in copy.iterdir()} == TRIAL_FILES


if __name__ == "__main__":
    sys.exit(main())
