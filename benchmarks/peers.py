"""What other tools answer on the same trained model and data, beside autocompress's front, in one run.

For a study (run or resumed here, or an existing run folder with ``--front-from``) this takes the float
ONNX export the study's baseline came from (the teacher, BatchNorm folded, exported as the backend
exports it: before ORT's optimizations, which is what ORT's and NNCF's quantizers want) and hands it to
the peers of :mod:`_peers` (ONNX Runtime ``quantize_dynamic`` / ``quantize_static``, NNCF
``quantize`` / ``quantize_with_accuracy_control``, Olive's CPU PTQ workflow), calibrated on the study's
calibration samples. Every answer, the front's best candidates and the float export are then scored on
the whole eval split with the study's metric by the study's backend (``Backend.evaluate``), and timed
side by side with the run's float baseline artifact ``baseline/model.onnx`` (the backend's optimized
float model) in one timing session (``Backend.measure_group``: alternating blocks, the same protocol
as the search), ``--rounds`` times (the median ratio is kept).

One table: metric, metric drop, speedup vs the baseline, artifact bytes, wall time to the answer
(a peer: its quantization call, pre-processing and validation passes included; autocompress: the
study's search: the union of its trials' run times, not the teacher or the run's set-up). Written as
``<run>/peers/peers.json`` and ``peers.md``, with the CPU's int8 features (AVX2 / VNNI / AMX).

Targets (per study by default; flags override): the best front model within the drop limit is at least
``--min-speedup`` x faster than the baseline, and at least ``--min-vs-peer`` x faster than the best peer
answer (the fastest peer within the same limit) among front models at an equal or better metric than
that answer (``--peer-compare limit``: among all front models within the limit).

Exit codes: 0 every target met (or ``--no-targets``), 1 a target missed (printed), 2 bad input.

Peers are extras of the benchmark, not dependencies of the package: ``pip install -e ".[peers]"``
(a peer that is not installed is a row saying so, with the import error).

Usage::

    python benchmarks/peers.py --study studies/resnet18.yaml            # run / resume the study first
    python benchmarks/peers.py --front-from runs/resnet18 --peers ort_dynamic,ort_static
    python benchmarks/peers.py --study studies/quickstart.yaml --trials 6 --output /tmp/qs --no-targets
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _peers  # noqa: E402
from _peers import PEERS, PeerInput, PeerResult, error_line, run_peer  # noqa: E402

CPU_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16")


@dataclass
class Targets:
    max_drop: float = 0.01
    drop_kind: str = "rel"  # rel: a fraction of the baseline's metric; abs: the metric's own units
    min_speedup: float | None = None
    min_vs_peer: float | None = 1.5
    # which front models face the best peer answer (the fastest peer within the limit): "metric", those
    # at an equal or better metric than that answer; "limit", every front model within the limit
    peer_compare: str = "metric"


# the figures; a study not named here gets the defaults of Targets
STUDY_TARGETS = {
    "bert_encoder": Targets(0.01, "rel", 2.5, 1.5),
    "resnet18": Targets(0.01, "abs", 3.0, 1.5),
}


class BadInput(Exception):
    """The command line or the run folder cannot be used (exit code 2)."""


# -- pure parts: CPU features, drops, targets, the table -----------------------------------------------
def cpu_features(cpuinfo: str) -> dict[str, bool]:
    """Which of :data:`CPU_FEATURES` the first ``flags`` line of ``/proc/cpuinfo`` lists."""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.startswith(("flags", "Features")):
            flags = set(line.split(":", 1)[1].split())
            break
    return {f: f in flags for f in CPU_FEATURES}


def drops(metric: float, base: float, sign: int) -> tuple[float, float]:
    """(absolute, relative) drop of ``metric`` below ``base`` (> 0 = worse)."""
    d = (base - metric) * sign
    return d, d / max(abs(base), 1e-12)


def within(row: dict, t: Targets) -> bool:
    if row.get("metric") is None:
        return False
    return (row["drop_rel"] if t.drop_kind == "rel" else row["drop"]) <= t.max_drop + 1e-12


def check_targets(rows: list[dict], t: Targets, sign: int = 1) -> list[tuple[str, bool, str]]:
    """``(target, met, why)`` for the speedup and the versus-peer target (those that apply)."""
    limit = f"{t.max_drop:.2%} {'relative' if t.drop_kind == 'rel' else 'absolute'} drop"
    ours = [r for r in rows if r["kind"] == "autocompress" and r["status"] == "ok" and within(r, t)]
    best = max(ours, key=lambda r: r["speedup"], default=None)
    out = []
    if t.min_speedup is not None:
        if best is None:
            out.append(("speedup", False, f"no front model within {limit}"))
        else:
            out.append(
                (
                    "speedup",
                    best["speedup"] >= t.min_speedup,
                    f"{best['name']}: {best['speedup']:.2f}x the float baseline at {limit} (target >= {t.min_speedup:g}x)",
                )
            )
    if t.min_vs_peer is not None:
        peers = [r for r in rows if r["kind"] == "peer" and r["status"] == "ok" and within(r, t)]
        peer = max(peers, key=lambda r: r["speedup"], default=None)
        if peer is None:
            ran = [r["name"] for r in rows if r["kind"] == "peer" and r["status"] == "ok"]
            why = (
                f"no peer answer within {limit} (peers that ran: {', '.join(ran) or 'none'}): nothing to beat"
                if ran
                else "no peer ran: nothing to compare with"
            )
            out.append(("vs peer", bool(ran), why))
        else:
            if t.peer_compare == "metric":
                ours = [r for r in ours if (r["metric"] - peer["metric"]) * sign >= -1e-12]
            mine = max(ours, key=lambda r: r["speedup"], default=None)
            if mine is None:
                out.append(
                    (
                        "vs peer",
                        False,
                        f"no front model within {limit} at a metric >= {peer['name']}'s {peer['metric']:.4f}",
                    )
                )
            else:
                ratio = mine["speedup"] / peer["speedup"]
                out.append(
                    (
                        "vs peer",
                        ratio >= t.min_vs_peer,
                        f"{mine['name']} ({mine['metric']:.4f}, {mine['speedup']:.2f}x) vs best peer "
                        f"{peer['name']} ({peer['metric']:.4f}, {peer['speedup']:.2f}x): {ratio:.2f}x "
                        f"(target >= {t.min_vs_peer:g}x)",
                    )
                )
    return out


def _num(v, fmt: str, none: str = "-") -> str:
    return none if v is None else format(v, fmt)


COLUMNS = (
    "answer",
    "status",
    "metric",
    "drop",
    "rel drop",
    "ms",
    "speedup",
    "kB",
    "smaller",
    "wall to answer",
)


def table_rows(rows: list[dict]) -> list[list[str]]:
    out = []
    for r in rows:
        ok = r["status"] == "ok"
        out.append(
            [
                r["name"],
                r["status"] if ok else f"{r['status']}: {r.get('reason', '')}",
                _num(r.get("metric"), ".4f"),
                _num(r.get("drop"), "+.4f"),
                _num(r.get("drop_rel"), "+.2%"),
                _num(r.get("latency_ms"), ".4f"),
                _num(r.get("speedup"), ".2f") + ("x" if r.get("speedup") is not None else ""),
                _num(None if r.get("size_bytes") is None else r["size_bytes"] / 1e3, ".1f"),
                _num(r.get("size_ratio"), ".2f") + ("x" if r.get("size_ratio") is not None else ""),
                _wall(r.get("wall_s")),
            ]
        )
    return out


def _wall(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"


def format_text(rows: list[dict]) -> str:
    body = table_rows(rows)
    widths = [max(len(c), *(len(b[i]) for b in body)) for i, c in enumerate(COLUMNS)]
    widths[1] = min(widths[1], 60)

    def line(cells: list[str]) -> str:
        return "  ".join(
            (c[: widths[i]] if i == 1 else c).ljust(widths[i]) if i < 2 else c.rjust(widths[i])
            for i, c in enumerate(cells)
        )

    return "\n".join([line(COLUMNS), "-" * (sum(widths) + 2 * len(widths)), *map(line, body)])


def format_markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in b) + " |" for b in table_rows(rows)]
    return "\n".join(lines)


def notes(rows: list[dict]) -> list[str]:
    """Each row's settings, or the whole reason it has no answer."""
    out = []
    for r in rows:
        if r["status"] != "ok":
            out.append(f"{r['name']}: {r['status']}: {r.get('reason', '')}")
        elif r.get("settings"):
            out.append(f"{r['name']}: {r['settings']}")
    return out


# -- the run ---------------------------------------------------------------------------------------------
def load_cfg(args):
    """``(config, run folder, ran_now)``: the study's config, run or resumed first unless ``--front-from``."""
    from autocompress.config import load_config
    from autocompress.errors import ConfigError

    try:
        if args.front_from:
            run_dir = Path(args.front_from)
            if not (run_dir / "study.yaml").is_file():
                raise BadInput(f"{run_dir}: not a run folder (no study.yaml)")
            if not (run_dir / "baseline" / "model.onnx").is_file():
                raise BadInput(f"{run_dir}: the run has no baseline/model.onnx")
            return load_config(run_dir / "study.yaml", {"output": str(run_dir)}), run_dir, False
        overrides = {}
        if args.trials is not None:
            overrides["trials.n"] = args.trials
        if args.output:
            overrides["output"] = args.output
        cfg = load_config(args.study, overrides)
    except ConfigError as exc:
        raise BadInput(str(exc)) from None
    from autocompress.search import run_study

    log = (lambda line: None) if args.quiet else print
    run_study(cfg, log=log)
    return cfg, Path(cfg.output), True


def search_wall_s(study) -> tuple[float | None, int]:
    """Seconds the search ran, and its completed trials: the union of the trials' start-to-end intervals
    (workers running trials at once count once; the pauses of a run resumed later do not count)."""
    from optuna.trial import TrialState

    done = [t for t in study.get_trials(deepcopy=False) if t.datetime_complete is not None]
    if not done:
        return None, 0
    return union_s([(t.datetime_start.timestamp(), t.datetime_complete.timestamp()) for t in done]), sum(
        t.state == TrialState.COMPLETE for t in done
    )


def union_s(intervals: list[tuple[float, float]]) -> float:
    """Total length of the union of ``(start, end)`` intervals."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def float_export(ctx, path: Path) -> Path:
    """The float ONNX the baseline came from: the teacher, BatchNorm folded, exported as the backend does."""
    from autocompress.backends.onnx_export import export_onnx
    from autocompress.tasks.data import deployable
    from autocompress.techniques import fold_batchnorm

    model, _ = fold_batchnorm(copy.deepcopy(ctx.teacher))
    export_onnx(deployable(model.eval(), ctx.task.io), ctx.task.example_inputs(), path, io=ctx.task.io)
    return path


def eval_samples(ctx) -> list:
    """The whole eval split as single samples ``(inputs, target, teacher output)``."""
    refs = ctx.reference(None)
    samples = []
    for b, (inputs, targets) in enumerate(ctx.task.eval_split.batches(None)):
        arrays = [t.numpy() for t in inputs]
        for i in range(len(arrays[0])):
            samples.append(
                (
                    tuple(np.ascontiguousarray(a[i : i + 1]) for a in arrays),
                    None if targets is None else targets[i : i + 1].numpy(),
                    None if refs is None else refs[b][i : i + 1],
                )
            )
    return samples


def sample_scorer(ctx):
    """``fn(onnx path, samples) -> (metric, per-sample metric)`` with the task's metric, run by the backend."""
    be, metric = ctx.backend, ctx.metric

    def score(path: Path, samples: list) -> tuple[float, list[float]]:
        run = be.runner(be.load_artifact(path))
        total, per = metric.start(), []
        for inputs, target, ref in samples:
            out = np.asarray(run(inputs))
            one = metric.start()
            metric.update(one, out, target, ref)
            metric.update(total, out, target, ref)
            per.append(float(metric.result(one)))
        return float(metric.result(total)), per

    return score


def front_candidates(study, t: Targets, base_metric: float, sign: int, k: int) -> list[dict]:
    """Up to ``k`` front models within the drop limit (on the whole eval set where the run re-scored
    them), fastest first by their recorded speedup."""
    from autocompress.export import front_records

    chosen = []
    for rec in front_records(study):
        m = rec["metric_full"] if rec.get("metric_full") is not None else rec["metric"]
        d, rel = drops(m, base_metric, sign)
        if (rel if t.drop_kind == "rel" else d) <= t.max_drop + 1e-12:
            chosen.append(rec)
    chosen.sort(key=lambda r: -(r["speedup"] or 0.0))
    return chosen[:k]


def time_rows(be, rows: list[dict], baseline, example, rounds: int, limits: dict, seed: int = 0) -> dict:
    """Latency of every row with an artifact, all timed side by side in one session per round
    (``Backend.measure_group``: alternating blocks), the baseline artifact among them as a candidate.

    Each round shuffles the candidates' order, and every ratio is taken against the baseline's
    candidate slot of the same round, not against the group's reference slot (always first in a round):
    on this shared VM that slot measured the very same file several percent (up to ~15%) slower than
    another slot, which would inflate every speedup. Kept: the median over rounds of each latency and
    ratio; returned: the reference slot's own ratio to the baseline's candidate slot, per round.
    """
    timed = [r for r in rows if r.get("artifact") is not None]
    base_i = next(i for i, r in enumerate(timed) if r["kind"] == "baseline")
    rng = np.random.default_rng(seed)
    per: list[list[tuple[float, float]]] = [[] for _ in timed]
    slot_bias = []
    for _ in range(rounds):
        order = list(rng.permutation(len(timed)))
        stats = be.measure_group([timed[i]["artifact"] for i in order], baseline, example, **limits)
        ms = {i: s.median_ms for i, (s, _) in zip(order, stats, strict=True)}
        slot_bias.append(stats[0][1].median_ms / ms[base_i])
        for i in range(len(timed)):
            per[i].append((ms[i], ms[base_i]))
    for r, samples in zip(timed, per, strict=True):
        r["latency_ms"] = statistics.median(s for s, _ in samples)
        r["baseline_ms"] = statistics.median(b for _, b in samples)
        r["speedups"] = [b / s for s, b in samples]
        r["speedup"] = statistics.median(r["speedups"])
    return {"reference_slot_vs_baseline_slot": slot_bias}


def build_rows(args, cfg, run_dir: Path, t: Targets, log) -> tuple[list[dict], dict]:
    from autocompress.backends.ort_fusions import transformer_like
    from autocompress.backends.ort_session import cpu_has_vnni
    from autocompress.rundir import open_study
    from autocompress.search.run_setup import context_from_folder, prepare

    study = open_study(run_dir)
    prep = prepare(cfg)
    be, task = prep.backend, prep.task
    info: dict = {}
    try:
        ctx = context_from_folder(cfg, run_dir, task, None, be)
        sign = ctx.metric.sign
        work = run_dir / "peers"
        work.mkdir(parents=True, exist_ok=True)
        baseline = be.load_artifact(run_dir / "baseline" / "model.onnx")
        t0 = time.perf_counter()
        base_metric = ctx.score(baseline, full=True)
        log(
            f"baseline {ctx.metric.name} {base_metric:.4f} on the whole eval split ({time.perf_counter() - t0:.1f} s)"
        )
        fp32 = float_export(ctx, work / "float.onnx")
        same = fp32.read_bytes() == baseline.path.read_bytes()
        import onnx

        inp = PeerInput(
            float_onnx=fp32,
            names=[i.name for i in be.session(fp32).get_inputs()],
            calibration=task.calibration_inputs(),
            samples=eval_samples(ctx) if "nncf_ac" in args.peers else [],
            score_samples=sample_scorer(ctx),
            sign=sign,
            reduce_range=not cpu_has_vnni(),
            transformer=transformer_like(onnx.load(str(fp32), load_external_data=False).graph),
            max_drop=t.max_drop,
            drop_kind=t.drop_kind,
            workdir=work,
        )
        rows: list[dict] = [
            {
                "kind": "baseline",
                "name": "float baseline",
                "status": "ok",
                "artifact": baseline,
                "settings": f"{run_dir / 'baseline' / 'model.onnx'}: the backend's optimized float artifact",
            },
            {
                "kind": "float",
                "name": "float export",
                "status": "ok",
                "artifact": be.load_artifact(fp32),
                "settings": "the peers' input: the teacher's float ONNX export before ORT's optimizations"
                + (" (byte-identical to the baseline artifact)" if same else ""),
            },
        ]
        for name in args.peers:
            log(f"peer {name} ...")
            res: PeerResult = run_peer(name, inp, log)
            row = {
                "kind": "peer",
                "name": name,
                "label": _peers.LABELS[name],
                "tool": res.tool,
                "status": res.status,
                "reason": res.reason,
                "wall_s": res.wall_s,
                "settings": res.settings,
                "artifact": be.load_artifact(res.path) if res.status == "ok" else None,
            }
            log(f"  {res.status}{': ' + res.reason if res.reason else ''} ({_wall(res.wall_s)})")
            rows.append(row)
        wall, completed = search_wall_s(study)
        for rec in front_candidates(study, t, base_metric, sign, args.candidates):
            rows.append(
                {
                    "kind": "autocompress",
                    "name": f"autocompress trial {rec['trial']}",
                    "status": "ok",
                    "trial": rec["trial"],
                    "wall_s": wall,
                    "settings": f"Pareto model of {completed} completed trials (search wall time); "
                    f"recorded speedup {rec['speedup'] or 0:.2f}x",
                    "artifact": be.load_artifact(run_dir / rec["source"] / "model.onnx"),
                }
            )
        if not any(r["kind"] == "autocompress" for r in rows):
            rows.append(
                {
                    "kind": "autocompress",
                    "name": "autocompress front",
                    "status": "none",
                    "reason": f"no front model within the drop limit ({completed} completed trials)",
                    "wall_s": wall,
                }
            )
        for r in rows:
            if r.get("artifact") is None:
                continue
            try:
                r["metric"] = base_metric if r["kind"] == "baseline" else ctx.score(r["artifact"], full=True)
            except Exception as exc:  # an answer that does not run on the eval data is a failed answer
                r.update(status="failed", reason=f"scoring failed: {error_line(exc)}", artifact=None)
                log(f"  {r['name']}: {r['reason']}")
                continue
            r["drop"], r["drop_rel"] = drops(r["metric"], base_metric, sign)
            r["size_bytes"] = r["artifact"].size_bytes
            r["size_ratio"] = baseline.size_bytes / r["size_bytes"]
        limits = {"max_s": args.timing_max_s} if args.timing_max_s else {}
        log(
            f"timing {sum(r.get('artifact') is not None for r in rows)} artifacts side by side, {args.rounds} round(s)"
        )
        bias = time_rows(be, rows, baseline, task.example_inputs(), args.rounds, limits)
        info = {
            "metric": ctx.metric.name,
            "sign": sign,
            "baseline_metric": base_metric,
            "eval_samples": task.eval_split.n_samples(),
            "calibration_samples": len(inp.calibration[0]),
            "search_trials": completed,
            "search_wall_s": wall,
            "backend": f"{be.name}/{be.device}, batch {be.batch_size}, {be.threads} thread(s)",
            "device": be.device_info().get("name"),
            "reduce_range": inp.reduce_range,
            "transformer": inp.transformer,
            "float_export_is_baseline": same,
            **bias,
        }
    finally:
        be.close()
    for r in rows:
        art = r.pop("artifact", None)
        r["path"] = str(art.path) if art is not None else None
    return rows, info


def timing_note(info: dict, rounds: int) -> str:
    bias = info.get("reference_slot_vs_baseline_slot") or []
    return (
        f"timing: {rounds} session(s), every artifact side by side with the baseline artifact, ratios to "
        f"the baseline's own slot; the group's reference slot (the same file) took "
        f"{', '.join(f'{b:.3f}' for b in bias)}x its time"
    )


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--study", help="study file: run (or resume) it, then compare")
    src.add_argument("--front-from", metavar="RUN_DIR", help="an existing run folder: read it, run nothing")
    p.add_argument("--trials", type=int, help="with --study: completed trials to reach (trials.n)")
    p.add_argument("--output", help="with --study: the run folder (output)")
    p.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated, of: {', '.join(PEERS)}")
    p.add_argument("--candidates", type=int, default=3, help="front models re-measured")
    p.add_argument("--rounds", type=int, default=3, help="timing sessions (median ratio kept)")
    p.add_argument("--timing-max-s", type=float, default=None, help="cap of one timing session")
    p.add_argument("--max-drop", type=float, help="drop limit (default: the study's target)")
    p.add_argument("--drop-kind", choices=("rel", "abs"), help="the limit is relative or absolute")
    p.add_argument("--min-speedup", type=float, help="target vs the float baseline (0: none)")
    p.add_argument("--min-vs-peer", type=float, help="target vs the best peer (0: none)")
    p.add_argument(
        "--peer-compare",
        choices=("metric", "limit"),
        help="front models that face the best peer: at an equal or better metric (default), or all within the limit",
    )
    p.add_argument("--no-targets", action="store_true", help="report only: exit 0 whatever the figures")
    p.add_argument("--quiet", action="store_true", help="hide the study's progress lines")
    args = p.parse_args(argv)
    args.peers = [s.strip() for s in args.peers.split(",") if s.strip()]
    unknown = [s for s in args.peers if s not in PEERS]
    if unknown:
        p.error(f"unknown peer(s) {unknown}; known: {', '.join(PEERS)}")
    if args.front_from and (args.trials is not None or args.output):
        p.error("--trials / --output go with --study (a run folder is read as it is)")
    return args


def targets_for(name: str, args) -> Targets:
    t = copy.copy(STUDY_TARGETS.get(name, Targets()))
    if args.max_drop is not None:
        t.max_drop = args.max_drop
    if args.drop_kind:
        t.drop_kind = args.drop_kind
    if args.min_speedup is not None:
        t.min_speedup = args.min_speedup or None
    if args.min_vs_peer is not None:
        t.min_vs_peer = args.min_vs_peer or None
    if args.peer_compare:
        t.peer_compare = args.peer_compare
    return t


def information(rows: list[dict], t: Targets, sign: int, results: list) -> list[tuple[str, bool, str]]:
    """The versus-peer figure at the limit as well (not a target), when the target compares at an equal
    or better metric: on a metric where every int8 answer is nearly exact (fidelity 0.9998) that leaves
    only int8 to compare. Left out where it reads the same as a target's figure."""
    if t.min_vs_peer is None or t.peer_compare != "metric":
        return []
    at_limit = Targets(t.max_drop, t.drop_kind, None, t.min_vs_peer, "limit")
    stated = {(m, w) for _, m, w in results}
    return [
        (f"{n} (any front model within the limit)", m, w)
        for n, m, w in check_targets(rows, at_limit, sign)
        if (m, w) not in stated
    ]


def main(argv=None) -> int:
    args = parse_args(argv)
    log = print
    t_start = time.perf_counter()
    try:
        cfg, run_dir, ran = load_cfg(args)
        t = targets_for(cfg.name, args)
        rows, info = build_rows(args, cfg, run_dir, t, log)
    except BadInput as exc:
        print(f"peers.py: {exc}", file=sys.stderr)
        return 2
    from autocompress.backends.device_facts import cpu_flags

    feats = cpu_features(cpu_flags())
    results = check_targets(rows, t, info["sign"])
    also = information(rows, t, info["sign"], results)
    cpu = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in feats.items())
    head = (
        f"{cfg.name}: {info['metric']} on {info['eval_samples']} eval samples (baseline "
        f"{info['baseline_metric']:.4f}); {info['backend']}; {info['device']}; CPU: {cpu}; limit "
        f"{t.max_drop:g} {t.drop_kind} drop"
    )
    text = format_text(rows)
    print()
    print(head)
    print(text)
    timing = timing_note(info, args.rounds)
    for line in [*notes(rows), timing]:
        print(f"  {line}")
    for name, met, why in results:
        print(f"target {name}: {'met' if met else 'MISSED'}: {why}")
    for name, met, why in also:
        print(f"for information, {name}: {'would be met' if met else 'would be missed'}: {why}")
    failed = [n for n, met, _ in results if not met]
    out = run_dir / "peers"
    record = {
        "study": cfg.name,
        "run_dir": str(run_dir),
        "command": " ".join(sys.argv),
        "ran_study": ran,
        "cpu_features": feats,
        "targets": asdict(t),
        "target_results": [{"target": n, "met": m, "why": w} for n, m, w in results],
        "information": [{"figure": n, "met": m, "why": w} for n, m, w in also],
        "rows": rows,
        "benchmark_wall_s": time.perf_counter() - t_start,
        **info,
    }
    (out / "peers.json").write_text(json.dumps(record, indent=2, default=str))
    md = [f"# peers: {cfg.name}", "", head, "", format_markdown(rows), ""]
    md += [f"* {line}" for line in [*notes(rows), timing]]
    md += ["", *(f"* target {n}: {'met' if m else 'MISSED'}: {w}" for n, m, w in results)]
    md += [f"* for information, {n}: {'would be met' if m else 'would be missed'}: {w}" for n, m, w in also]
    (out / "peers.md").write_text("\n".join(md) + "\n")
    print(f"written: {out / 'peers.json'}, {out / 'peers.md'}")
    if args.no_targets:
        return 0
    if failed:
        print(f"targets missed: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
