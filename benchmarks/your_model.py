"""Your own model: what the two shipped user-model studies cost and what they find.

For ``studies/bert_encoder.yaml`` (a transformers BERT encoder, dict inputs, fidelity) and
``studies/resnet18.yaml`` (a torchvision-style ResNet-18 at 3x64x64, accuracy) this prints:

* the run: wall time of ``autocompress run`` and its peak resident memory (when this benchmark ran it,
  or from a GNU ``time -v`` log given with ``--time-log``), completed / failed trials;
* the baseline's cost (lowering, evaluation on the search subset and on the whole eval set, timing) and
  the teacher's own evaluation (its torch outputs on the eval set: the fidelity reference, computed once
  per run);
* the per-trial cost split from each trial's recorded ``seconds`` (fine-tune, of which the training
  loop, lowering, evaluation, timing; median and max over completed trials), and disk per trial;
* the front's best speedup and best size ratio within the study's budget, each a ratio to the
  baseline artifact timed side by side in the same run, with the metric on the search subset and on
  the whole eval set.

Usage::

    python benchmarks/your_model.py                 # read finished runs; run a study that has none
    python benchmarks/your_model.py --run           # run both studies again into fresh folders
    python benchmarks/your_model.py --time-log bert_encoder=runs/logs/bert.log

Exits 1 when a study has no feasible model on its front (or its run failed).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _shared import ROOT

STUDIES = ("studies/bert_encoder.yaml", "studies/resnet18.yaml")
RECORD = "your_model_run.json"  # written in the run folder when this benchmark ran the study
PHASES = ("finetune", "train", "lower", "evaluate", "measure", "total")


def run_cli(study: Path, output: Path) -> dict:
    """``autocompress run`` in a child process: wall time, peak RSS (os.wait4 of that child), exit code."""
    cmd = [sys.executable, "-m", "autocompress.cli", "run", str(study), "--output", str(output)]
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    t0 = time.perf_counter()
    log = output.parent / f"{output.name}.log"
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    rc = os.waitstatus_to_exitcode(status)
    record = {
        "command": " ".join(["autocompress", "run", str(study.relative_to(ROOT)), "--output", str(output)]),
        "wall_s": time.perf_counter() - t0,
        "peak_rss_mb": usage.ru_maxrss / 1024,  # Linux: kB
        "exit_code": rc,
        "log": str(log),
        "measured_by": "benchmarks/your_model.py (os.wait4)",
    }
    if output.exists():
        (output / RECORD).write_text(json.dumps(record, indent=2))
    return record


def from_time_log(path: Path) -> dict:
    """Wall time and peak RSS of a run from a GNU ``/usr/bin/time -v`` log."""
    text = path.read_text(errors="replace")
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text)
    code = re.search(r"Exit status: (\d+)", text)
    if not (rss and wall):
        raise SystemExit(f"{path}: not a GNU time -v log (no peak RSS / wall time found)")
    secs = 0.0
    for part in wall.group(1).split(":"):
        secs = secs * 60 + float(part)
    return {
        "wall_s": secs,
        "peak_rss_mb": int(rss.group(1)) / 1024,
        "exit_code": int(code.group(1)) if code else None,
        "log": str(path),
        "measured_by": "GNU time -v",
    }


def teacher_eval_s(cfg) -> float:
    """Seconds of the teacher's torch forward over the search's eval subset (the run does it once)."""
    import torch

    from autocompress.tasks import load_task
    from autocompress.tasks.data import deployable

    task = load_task(cfg.task.name, cfg.task.options)
    torch.set_num_threads(cfg.finetune.threads)
    model = deployable(task.teacher(), task.io)
    t0 = time.perf_counter()
    with torch.no_grad():
        for inputs, _ in task.eval_split.batches(cfg.trials.eval_samples):
            model(*inputs)
    return time.perf_counter() - t0


def _fmt(s: float) -> str:
    return f"{int(s) // 60}m{int(s) % 60:02d}s"


def _disk(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def report(study_file: Path, run_dir: Path, record: dict | None, remeasure: bool = True) -> bool:
    """Print one study's figures; True when its front has a feasible model."""
    from optuna.trial import TrialState

    import autocompress
    from autocompress.config import load_config
    from autocompress.pareto import metric_drop, relative_drop, within_budgets

    cfg = load_config(study_file, {"output": str(run_dir)})
    print(f"== {cfg.name}: {study_file.relative_to(ROOT)} -> {run_dir}")
    if record:
        rc = record.get("exit_code")
        print(
            f"run: wall {_fmt(record['wall_s'])} ({record['wall_s']:.0f} s), peak RSS "
            f"{record['peak_rss_mb']:.0f} MB, exit code {rc} [{record['measured_by']}]"
        )
    else:
        print("run: wall time / peak RSS not recorded (run by `autocompress run`; use --run or --time-log)")
    if not (run_dir / "baseline" / "metrics.json").exists():
        print("no baseline: the run did not get past its set-up")
        return False
    study = autocompress.load_run(str(run_dir))
    trials = study.get_trials(deepcopy=False)
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    failed = [t for t in trials if t.state == TrialState.FAIL]
    base = json.loads((run_dir / "baseline" / "metrics.json").read_text())
    name = base.get("metric_name", "metric")
    print(f"trials: {len(done)} completed, {len(failed)} failed, {len(trials)} in all")
    for t in failed[:3]:
        print(f"  failed trial {t.number}: {t.user_attrs.get('fail_reason', '?')}")
    bs = base.get("seconds", {})
    print(
        f"baseline: {name} {base['metric']:.4f} (whole eval set {base.get('metric_full', base['metric']):.4f}) | "
        f"{base['latency_ms']:.2f} ms | {base['size_bytes'] / 1e6:.1f} MB | cost: lower {bs.get('lower', 0):.1f} s, "
        f"evaluate {bs.get('evaluate', 0):.1f} s ({base.get('eval_samples') or 'all'} samples), evaluate all "
        f"{bs.get('evaluate_full', 0):.1f} s, timing {bs.get('measure', 0):.1f} s"
    )
    if "teacher_evaluate" in bs and bs["teacher_evaluate"] < 1e-3:
        shown = "none (the metric needs no teacher outputs; KD's teacher forward is in the fine-tune)"
    elif "teacher_evaluate" in bs:
        shown = f"{bs['teacher_evaluate']:.1f} s (recorded by the run)"
    else:  # a run folder from before the baseline recorded it: timed here
        shown = f"{teacher_eval_s(cfg):.1f} s (timed here, search subset)"
    print(f"teacher evaluation (torch, its outputs as the metric's reference, once per run): {shown}")
    if done:
        secs = {p: [t.user_attrs.get("seconds", {}).get(p, 0.0) for t in done] for p in PHASES}
        split = ", ".join(f"{p} {statistics.median(v):.1f} s (max {max(v):.1f})" for p, v in secs.items())
        print(f"per trial (median over {len(done)}): {split}")
        disk = [t.user_attrs.get("disk_bytes", 0) for t in done]
        print(
            f"disk per trial: median {statistics.median(disk) / 1e6:.1f} MB (max {max(disk) / 1e6:.1f}) when "
            f"written; run folder now {_disk(run_dir) / 1e6:.0f} MB (keep: {cfg.trials.keep})"
        )
    budgets = cfg.budgets.model_dump()
    scores = study.user_attrs.get("metric_full", {})  # trial number -> whole-eval-set scores
    base_full = base.get("metric_full", base["metric"])
    front, subset_only = [], []
    for t in study.best_trials:
        m = dict(t.user_attrs)
        if "metric_drop" not in m or not within_budgets(m, **budgets):
            continue
        got = scores.get(str(t.number), {})
        full = got.get("metric", got.get("metric_full"))  # (runs of the t12s branch before its merge)
        if full is not None:  # the budget judged on the whole eval set, as a user would deploy it
            m["metric_full"] = full
            m["metric_drop"] = metric_drop(full, base_full, base.get("metric_sign", 1))
            m["metric_drop_rel"] = relative_drop(m["metric_drop"], base_full)
            if not within_budgets(m, **budgets):
                subset_only.append(t.number)
                continue
        front.append((t.number, m))
    limits = ", ".join(f"{k} {v}" for k, v in budgets.items() if v is not None) or "none"
    if subset_only:
        print(
            f"front: trials {subset_only} met the budget on the search subset only (not on the whole eval set)"
        )
    if not front:
        print(f"front: NO feasible model within the budget ({limits})")
        return False
    print(f"front: {len(front)} feasible models within the budget ({limits}, whole eval set); speedup and")
    print("       size ratio vs the baseline artifact timed side by side in the same run:")
    for num, m in sorted(front, key=lambda x: -x[1]["speedup"]):
        full = m.get("metric_full")
        shown = f", all {full:.4f}" if full is not None else ""
        print(
            f"  trial {num:3d}: {name} {m['metric']:.4f}{shown} | {m['latency_ms']:.2f} ms, "
            f"{m['speedup']:.2f}x faster | {m['size_bytes'] / 1e6:.1f} MB, {m['size_ratio']:.2f}x smaller"
        )
    fast = max(front, key=lambda x: x[1]["speedup"])
    small = max(front, key=lambda x: x[1]["size_ratio"])
    print(
        f"best at the budget: speedup {fast[1]['speedup']:.2f}x (trial {fast[0]}), "
        f"size ratio {small[1]['size_ratio']:.2f}x (trial {small[0]})"
    )
    if remeasure:
        _remeasure(cfg, run_dir, study, sorted({fast[0], small[0]}))
    return True


def _remeasure(cfg, run_dir: Path, study, numbers: list[int]) -> None:
    """Time the best models again, each side by side with the baseline artifact, in this process."""
    from autocompress.backends import BACKENDS

    backend = BACKENDS.get(cfg.backend.name)(
        device=cfg.backend.device, batch_size=cfg.backend.batch_size, threads=cfg.backend.threads
    )
    try:
        base_art = backend.load_artifact(run_dir / "baseline" / "model.onnx")
        from autocompress.tasks import load_task

        inputs = load_task(cfg.task.name, cfg.task.options).example_inputs()  # the deployed shape
        trials = {t.number: t for t in study.get_trials(deepcopy=False)}
        for num in numbers:
            path = run_dir / trials[num].user_attrs["artifact"]
            if not path.exists():
                continue
            lat, ref = backend.measure_pair(backend.load_artifact(path), base_art, inputs)
            print(
                f"re-timed now, side by side: trial {num} {lat.median_ms:.2f} ms vs baseline "
                f"{ref.median_ms:.2f} ms = {ref.median_ms / lat.median_ms:.2f}x "
                f"(n {lat.n}/{ref.n})"
            )
    finally:
        backend.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", action="store_true", help="run each study again into a fresh folder")
    ap.add_argument("--keep", action="store_true", help="keep the fresh folders of --run")
    ap.add_argument(
        "--time-log",
        action="append",
        default=[],
        metavar="NAME=LOG",
        help="GNU time -v log of the study NAME's run (wall time, peak RSS)",
    )
    ap.add_argument("--study", action="append", help="only these study files (default: both)")
    ap.add_argument(
        "--no-remeasure", action="store_true", help="do not re-time the best models beside the baseline"
    )
    args = ap.parse_args(argv)
    from autocompress.config import load_config

    logs = dict(item.split("=", 1) for item in args.time_log)
    ok = True
    tmp = Path(tempfile.mkdtemp(prefix="ac-your-model-")) if args.run else None
    try:
        for rel in args.study or STUDIES:
            study_file = ROOT / rel
            cfg = load_config(study_file)
            run_dir = ROOT / cfg.output_dir()
            record = None
            if tmp is not None or not (run_dir / "study.db").exists():
                run_dir = (tmp / cfg.name) if tmp is not None else run_dir
                print(f"running {rel} (this takes minutes) ...", flush=True)
                record = run_cli(study_file, run_dir)
            elif cfg.name in logs:
                record = from_time_log(Path(logs[cfg.name]))
            elif (run_dir / RECORD).exists():
                record = json.loads((run_dir / RECORD).read_text())
            good = report(study_file, run_dir, record, not args.no_remeasure) and (record or {}).get(
                "exit_code"
            ) in (0, None)
            ok = ok and good
            print()
    finally:
        if tmp is not None and not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
