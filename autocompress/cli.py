"""The command line: ``autocompress run | report | pick | measure | rebuild | doctor``."""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

import yaml

from .errors import AutoCompressError, ConfigError


def _overrides(pairs: list[str], flag: str = "--set") -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"{flag} expects KEY=VALUE, got {pair!r}", source="command line", field=flag)
        out[key] = yaml.safe_load(value)
    return out


def _check_flags(args, **rules: tuple[float, float | None, bool]) -> None:
    """Each flag (attribute name: (lowest, highest or None, whether the lowest is excluded)) that was given
    lies in its range, else ConfigError naming the flag."""
    for name, (low, high, open_low) in rules.items():
        value = getattr(args, name, None)
        if value is None:
            continue
        flag = "--" + name.replace("_", "-")
        too_low = value <= low if open_low else value < low
        if too_low or (high is not None and value > high) or value != value:
            bound = f"> {low:g}" if open_low else f">= {low:g}"
            rule = f"{bound} and <= {high:g}" if high is not None else bound
            raise ConfigError(
                f"{value:g} is out of range (must be {rule})", source="command line", field=flag
            )


def cmd_run(args) -> int:
    from .config import load_config
    from .search import run_study

    _check_flags(args, n_trials=(1, None, False), stop_after=(0, None, False))
    overrides = _overrides(args.set or [])
    if args.output:
        overrides["output"] = args.output
    cfg = load_config(args.study, overrides)
    if args.ray:
        from .search.ray_runner import run_study_ray

        summary = run_study_ray(cfg, args.ray, n_trials=args.n_trials)
    else:
        summary = run_study(cfg, n_trials=args.n_trials, stop_after=args.stop_after)
    if summary.stopped == "failures":
        print(
            f"error: the study stopped after too many failed trials ({summary.completed}/{summary.requested} "
            "completed); see fail_reason in trials.csv",
            file=sys.stderr,
        )
        return 1
    return 0


def cmd_inspect(args) -> int:
    import pandas as pd

    from .config import load_config
    from .inspection import analyze, heatmap, ranking, table
    from .search import open_run

    cfg = load_config(
        args.study, _overrides(args.set or []) | ({"output": args.output} if args.output else {})
    )
    with open_run(cfg) as (ctx, _study):
        df = analyze(ctx, use_cache=not args.no_cache)
    df.to_csv(ctx.run_dir / "sensitivity.csv", index=False)
    png = heatmap(df, ctx.run_dir / "sensitivity.png")
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print("metric drop of the artifact, one layer at a time, no fine-tuning:")
        print(table(df).to_string(float_format=lambda v: f"{v:.4f}"))
        rank = ranking(df)
        print(
            f"most sensitive: {rank.index[0]} (mean drop {rank.iloc[0]:.4f}); "
            f"least sensitive: {rank.index[-1]} (mean drop {rank.iloc[-1]:.4f})"
        )
    print(f"wrote {ctx.run_dir / 'sensitivity.csv'}, {png}")
    return 0


def cmd_worker(args) -> int:
    from .config import load_config
    from .search.worker import run_worker

    _check_flags(args, n_trials=(1, None, False))
    overrides = _overrides(args.set or [])
    if args.output:
        overrides["output"] = args.output
    if args.storage:
        overrides["storage"] = args.storage
    summary = run_worker(load_config(args.study, overrides), n_trials=args.n_trials)
    return 1 if summary.stopped == "failures" else 0


def cmd_report(args) -> int:
    from .export import export_front
    from .report_answer import text_report
    from .report_html import write_report
    from .rundir import PARETO, open_study

    run_dir = Path(args.run)
    study = open_study(run_dir, args.storage, args.study)
    export_front(study, run_dir)
    paths = write_report(study, run_dir)
    print("\n".join(text_report(study, run_dir)))
    print(f"wrote {paths['html']}, {paths['trials']}, {paths['plot']}, {run_dir / PARETO}/")
    return 0


def cmd_pick(args) -> int:
    from .export import front_records
    from .pareto import pick
    from .rundir import open_study

    _check_flags(
        args,
        max_latency_ms=(0, None, True),
        max_size_bytes=(0, None, True),
        max_metric_drop=(0, None, False),
        max_metric_drop_rel=(0, 1, False),
    )
    run_dir = Path(args.run)
    study = open_study(run_dir, args.storage, args.study)
    budgets = {
        "max_latency_ms": args.max_latency_ms,
        "max_size_bytes": args.max_size_bytes,
        "max_metric_drop": args.max_metric_drop,
        "max_metric_drop_rel": args.max_metric_drop_rel,
    }
    chosen = pick(front_records(study), **budgets)
    if chosen is None:
        given = ", ".join(f"{k}={v}" for k, v in budgets.items() if v is not None) or "none"
        print(f"no Pareto model of {run_dir} fits the budgets ({given})", file=sys.stderr)
        return 1
    folder = run_dir / chosen["folder"]
    if not folder.is_dir():  # front.json predates this trial: rebuild the export
        from .export import export_front

        export_front(study, run_dir)
    print(folder)
    print(json.dumps({k: v for k, v in chosen.items() if k != "source"}, indent=2))
    return 0


def cmd_rebuild(args) -> int:
    from .rebuild import format_report, rebuild_trial

    report = rebuild_trial(args.run, args.trial, storage=args.storage, study_name=args.study, out=args.output)
    for line in format_report(report):
        print(line)
    if not report["metric_identical"]:
        print("error: the rebuilt artifact's metric differs from the stored one", file=sys.stderr)
        return 1
    return 0


def cmd_measure(args) -> int:
    from .measure import format_stats, time_artifact

    _check_flags(args, threads=(1, 256, False), batch_size=(1, 4096, False))
    stats, env = time_artifact(
        args.artifact,
        args.backend,
        args.device,
        batch_size=args.batch_size,
        threads=args.threads,
        options=_overrides(args.option or [], "--option"),
    )
    if args.json:
        print(json.dumps({"latency": stats.to_dict(), "environment": env}, indent=2))
    else:
        print(format_stats(args.artifact, stats, env))
    return 0


def cmd_doctor(args) -> int:
    from .doctor import host_check

    return host_check(Path(args.report), Path(args.workdir))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="autocompress", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run (or resume) a study: search, measure, export, report")
    r.add_argument("study", help="study file (YAML), or a bundled study's name (e.g. quickstart)")
    r.add_argument("--n-trials", type=int, help="completed trials to reach (overrides trials.n)")
    r.add_argument("--output", help="run folder (overrides output)")
    r.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a field, e.g. --set seed=3")
    r.add_argument("--stop-after", type=int, help=argparse.SUPPRESS)
    r.add_argument("--ray", metavar="ADDRESS", help="run the trials on a Ray cluster (ADDRESS or 'auto')")
    r.set_defaults(func=cmd_run)

    i = sub.add_parser(
        "inspect", help="per-layer sensitivity of accuracy to each bit width, sparsity and rank"
    )
    i.add_argument("study", help="study file (YAML)")
    i.add_argument("--output", help="run folder (overrides output)")
    i.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a field")
    i.add_argument("--no-cache", action="store_true", help="recompute even if sensitivity.json matches")
    i.set_defaults(func=cmd_inspect)

    w = sub.add_parser("worker", help="join a study through its shared storage (run one per process/host)")
    w.add_argument("study", help="study file (YAML) whose storage is shared (PostgreSQL URL or journal file)")
    w.add_argument("--storage", help="storage URL (overrides storage)")
    w.add_argument(
        "--n-trials", type=int, help="completed trials the study should reach (overrides trials.n)"
    )
    w.add_argument("--output", help="run folder (overrides output)")
    w.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a field")
    w.set_defaults(func=cmd_worker)

    for name, helptext in (
        ("report", "re-render tables, plots and the Pareto export from the storage"),
        ("pick", "the best Pareto model under budgets"),
    ):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("run", help="run folder (e.g. runs/quickstart)")
        s.add_argument("--storage", help="storage URL when the run did not use its own SQLite file")
        s.add_argument("--study", help="study name when the storage holds several")
        s.set_defaults(func=cmd_report if name == "report" else cmd_pick)
        if name == "pick":
            s.add_argument("--max-latency-ms", type=float)
            s.add_argument("--max-size-bytes", type=float)
            s.add_argument("--max-metric-drop", type=float, help="absolute, in the metric's units")
            s.add_argument("--max-metric-drop-rel", type=float, help="relative to the baseline (0.01 = 1%%)")

    m = sub.add_parser("measure", help="time an exported artifact on its own (median, p90, IQR, count)")
    m.add_argument("artifact", help="the deployable file, e.g. runs/x/pareto/trial-00012/model.onnx")
    m.add_argument("--backend", default="onnxruntime", help="backend that runs it (default: onnxruntime)")
    m.add_argument("--device", default="cpu", help="cpu, cuda:N or npu:N (default: cpu)")
    m.add_argument("--batch-size", type=int, default=1)
    m.add_argument("--threads", type=int, default=1)
    m.add_argument("--option", action="append", metavar="KEY=VALUE", help="backend option, e.g. pin_core=0")
    m.add_argument("--json", action="store_true", help="print the stats and environment as JSON")
    m.set_defaults(func=cmd_measure)

    b = sub.add_parser("rebuild", help="re-create a trial's artifact from its stored plan and compare")
    b.add_argument("run", help="run folder (e.g. runs/quickstart)")
    b.add_argument("trial", type=int, help="trial number")
    b.add_argument("--output", help="folder to write (default: RUN/rebuilt/trial-NNNNN)")
    b.add_argument("--storage", help="storage URL when the run did not use its own SQLite file")
    b.add_argument("--study", help="study name when the storage holds several")
    b.set_defaults(func=cmd_rebuild)

    d = sub.add_parser(
        "doctor", help="on an Ascend host: run the NPU checks and write one report to send back"
    )
    d.add_argument("--device", choices=["npu"], required=True, help="the device kind to check (npu)")
    d.add_argument("--report", default="ascend_host_report.md", help="report file (Markdown)")
    d.add_argument("--workdir", default="ascend_host_check", help="folder for the models and the study")
    d.set_defaults(func=cmd_doctor)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except AutoCompressError as exc:  # not the input's fault: still one clear line
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume", file=sys.stderr)
        return 130


def run() -> None:
    """The ``autocompress`` program: :func:`main`, then the exit.

    What is alive at the end is frozen first: the interpreter's last garbage collection would otherwise
    walk the whole heap of torch, ONNX Runtime and pandas (about a second of every command) just before
    the process ends. That collection is also what closed the SQLite storages' connections, so they are
    closed explicitly before (:func:`~autocompress.search.storage.close_sqlite_storages`): a finished run
    folder keeps no ``study.db-wal`` / ``study.db-shm``. (``main`` called from Python leaves the
    caller's heap alone.)
    """
    rc = main()
    storage = sys.modules.get("autocompress.search.storage")
    if storage is not None:
        storage.close_sqlite_storages()
    sys.stdout.flush()
    sys.stderr.flush()
    gc.freeze()
    sys.exit(rc)


if __name__ == "__main__":
    run()
