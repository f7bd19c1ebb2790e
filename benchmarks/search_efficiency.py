"""Does the joint search pay? Hypervolume vs trial count: joint vs random vs single-technique searches.

For each study (quickstart and mnist1d_cnn by default) and each seed, five searches run at the same
trial budget, each in its own run folder (the study's teacher is trained once and copied in):

- ``joint``: the study as a user runs it: its joint space, its default sampler, and its first trials
  as the study file says (the shipped studies have no hand-written warm starts: their first trials
  are the planned starts built from the measured latency and accuracy profiles, search/planned_starts.py);
- ``random``: the same space, Optuna's RandomSampler, no warm starts and no planned starts;
- ``quant``, ``prune``, ``lowrank``: the joint space with the other techniques fixed off
  (quant: sparsity 0 and rank 1; prune: float weights and rank 1; lowrank: float weights and
  sparsity 0), the default sampler, and the study's warm starts (if any) projected onto that
  technique; no planned starts.

All share the study's fine-tuning (``--epochs`` overrides it for every method alike) and one latency
cache per study (the same structure is timed once, side by side with the baseline).

Objectives are normalized against the baseline artifact measured in the same run folder and all
minimized: accuracy drop (baseline accuracy - accuracy, in points of 1), latency ratio (1 / the
side-by-side speedup) and size ratio (size / baseline size). Reference point (fixed, the same as the
HTML report's, ``autocompress.pareto.HV_REFERENCE``): (0.10, 1.0, 1.0): a model counts only when it
loses less than 10 points and is both faster and smaller than the baseline. Hypervolume is Optuna's
own (through ``autocompress.optuna_compat.hypervolume``), divided by the reference box's volume (0.1): 1.0 would be a lossless
model that takes no time and no bytes.

Prints, per study, the median (and min-max over seeds) hypervolume at the full budget for every
method, the trials the joint search needs to reach random search's final median hypervolume, and
saves ``search_efficiency.png`` (median hypervolume vs trials, band = min-max over seeds).
Exits 1 unless the joint search's median final hypervolume beats every other method's on every study,
and, with ``--reach-within N``, unless the joint search's median curve reaches random search's final
median hypervolume within N trials.

Usage::

    python benchmarks/search_efficiency.py                       # 5 seeds x 5 methods x 2 studies
    python benchmarks/search_efficiency.py --seeds 5 --trials 20 --jobs 2 --out bench-se
    # issue 13's check: planned joint search vs 100 random trials, joint within 50
    python benchmarks/search_efficiency.py --methods joint random --trials 50 --random-trials 100 \
        --reach-within 50 --epochs 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _shared import copy_teacher  # noqa: E402

from autocompress.pareto import HV_REFERENCE as REFERENCE  # noqa: E402  (drop, latency ratio, size ratio)
from autocompress.pareto import hypervolume_history, normalized_objectives  # noqa: E402

METHODS = ("joint", "random", "quant", "prune", "lowrank")
TECHNIQUE_KEYS = {"quant": ("bits",), "prune": ("sparsity", "sparsity_kind"), "lowrank": ("rank_ratio",)}
OFF = {
    "quant": {
        "sparsity": {"fixed": 0.0},
        "sparsity_kind": {"fixed": "unstructured"},
        "rank_ratio": {"fixed": 1.0},
    },
    "prune": {"bits": {"fixed": 32}, "rank_ratio": {"fixed": 1.0}},
    "lowrank": {
        "bits": {"fixed": 32},
        "sparsity": {"fixed": 0.0},
        "sparsity_kind": {"fixed": "unstructured"},
    },
}


def overrides_for(method: str, base: dict, seed: int, out: Path, cache: Path, epochs: int | None) -> dict:
    """The study-file overrides that turn the user's study into ``method``."""
    o: dict = {
        "sampler.seed": seed,  # the sampler only: every search starts from the same teacher
        "output": str(out),
        "backend.latency_cache": str(cache),
        "trials.timeout_s": None,
    }
    if epochs is not None:
        o["finetune.epochs"] = epochs
    warm = base["trials"].get("warm_start", [{"bits": 8}])
    if method == "random":
        o["sampler.name"], o["sampler.options"], o["trials.warm_start"] = "random", {}, []
    elif method in OFF:
        space_over = dict(base["space"].get("overrides") or {})
        space_over.update(OFF[method])
        o["space.overrides"] = space_over
        projected = []
        for ws in warm:
            p = {k: v for k, v in ws.items() if k in TECHNIQUE_KEYS[method]}
            if p and p not in projected and set(p) != {"sparsity_kind"}:
                projected.append(p)
        o["trials.warm_start"] = projected
    return o


def normalized(trial, base: dict) -> tuple[float, float, float] | None:
    ua = trial.user_attrs
    if trial.state.name != "COMPLETE" or "speedup" not in ua:
        return None
    return normalized_objectives(ua["metric_drop_rel"], ua["speedup"], ua["size_ratio"])


def budget(method: str, args) -> int:
    return args.random_trials if method == "random" and args.random_trials else args.trials


def one_search(args: tuple) -> dict:
    """Run one (study, method, seed) search; return its hypervolume curve."""
    study_file, method, seed, folder, trials, epochs, threads = args
    import yaml

    from autocompress.config import load_config
    from autocompress.search import run_study

    base = yaml.safe_load(Path(study_file).read_text())
    out = Path(folder) / f"{method}-seed{seed}"
    over = overrides_for(method, base, seed, out, Path(folder) / "latency_cache.db", epochs)
    if threads:
        over["finetune.threads"] = threads
    copy_teacher(Path(folder) / "teacher", out)
    cfg = load_config(study_file, over)
    t0 = time.perf_counter()
    summary = run_study(cfg, n_trials=trials, log=lambda line: None)
    study = summary.study
    b = study.user_attrs["baseline"]
    done = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    pts = [normalized(t, b) for t in done if t.state.name in ("COMPLETE", "FAIL")]
    return {
        "method": method,
        "seed": seed,
        "curve": hypervolume_history(pts)[:trials],
        "failed": sum(p is None for p in pts),
        "wall_s": time.perf_counter() - t0,
    }


def train_teacher_once(study_file: Path, folder: Path) -> None:
    """Train the study's teacher once (its own run-folder cache) for every search to copy."""
    from autocompress.config import load_config
    from autocompress.search import run_study

    teacher = folder / "teacher"
    if (teacher / "teacher.safetensors").exists():
        return
    if copy_teacher(ROOT / load_config(study_file).output, teacher):  # an `autocompress run` trained it
        return
    cfg = load_config(study_file, {"output": str(teacher), "trials.warm_start": [], "trials.timeout_s": None})
    run_study(cfg, n_trials=1, log=print)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("studies", nargs="*", default=["studies/quickstart.yaml", "studies/mnist1d_cnn.yaml"])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--trials", type=int, default=20, help="trial budget of every search")
    p.add_argument(
        "--epochs", type=int, default=None, help="fine-tuning epochs for every method (default: the study's)"
    )
    p.add_argument(
        "--jobs", type=int, default=1, help="searches run at once (timing is serialized by the device lock)"
    )
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "search_efficiency")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="searches to run")
    p.add_argument(
        "--random-trials", type=int, default=None, help="random search's budget (default --trials)"
    )
    p.add_argument(
        "--reach-within",
        type=int,
        default=None,
        help="exit 1 unless the joint search reaches random's final median hypervolume within this many trials",
    )
    args = p.parse_args()
    if "joint" not in args.methods:
        p.error("--methods must include joint (every figure compares against it)")

    results: dict[str, list[dict]] = {}
    t_start = time.perf_counter()
    for study in args.studies:
        study_file = (ROOT / study).resolve()
        folder = args.out / study_file.stem
        folder.mkdir(parents=True, exist_ok=True)
        train_teacher_once(study_file, folder)
        threads = 1  # two torch threads per search thrash when searches or other processes share the cores
        todo = [
            (str(study_file), m, s, str(folder), budget(m, args), args.epochs, threads)
            for s in range(args.seeds)
            for m in args.methods
        ]
        runs: list[dict] = []
        with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
            for r in pool.map(one_search, todo):
                runs.append(r)
                print(
                    f"  {study_file.stem} {r['method']:<8} seed {r['seed']}: hypervolume {r['curve'][-1]:.4f} "
                    f"({r['failed']} failed, {r['wall_s']:.0f} s)",
                    flush=True,
                )
        results[study_file.stem] = runs
        (folder / "curves.json").write_text(json.dumps(runs))

    ok = report(results, args)
    print(f"total wall time {(time.perf_counter() - t_start) / 60:.1f} min")
    return 0 if ok else 1


def report(results: dict[str, list[dict]], args) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    ok = True
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5), squeeze=False)
    print()
    methods = args.methods
    print(
        f"Final hypervolume, {args.seeds} seeds (reference point {REFERENCE}: drop, latency ratio, size ratio); "
        "trials: " + ", ".join(f"{m} {budget(m, args)}" for m in methods)
    )
    for ax, (study, runs) in zip(axes[0], results.items(), strict=True):
        curves = {m: np.asarray([r["curve"] for r in runs if r["method"] == m]) for m in methods}
        finals = {m: c[:, -1] for m, c in curves.items()}
        med = {m: float(np.median(v)) for m, v in finals.items()}
        print(f"{study}:")
        print(f"  {'method':<9}{'median':>9}{'min':>9}{'max':>9}")
        for m in methods:
            beaten = m == "joint" or med["joint"] > med[m] or budget(m, args) > args.trials
            mark = "" if beaten else "   <- not beaten by joint"
            ok &= beaten
            print(f"  {m:<9}{med[m]:>9.4f}{finals[m].min():>9.4f}{finals[m].max():>9.4f}{mark}")
        if "random" in methods:
            joint_med_curve = np.median(curves["joint"], axis=0)
            reach = np.nonzero(joint_med_curve >= med["random"])[0]
            need = f"{reach[0] + 1}" if len(reach) else f"more than {args.trials}"
            print(
                f"  joint search reaches random search's final median hypervolume ({budget('random', args)} "
                f"trials, {med['random']:.4f}) after {need} of {args.trials} trials"
            )
            if args.reach_within is not None:
                hit = bool(len(reach)) and reach[0] + 1 <= args.reach_within
                ok &= hit
                if not hit:
                    best = float(joint_med_curve[: args.reach_within].max())
                    print(
                        f"  <- missed: within {args.reach_within} trials the joint median reaches {best:.4f} "
                        f"({best / med['random']:.1%} of random's)"
                    )
        for m in methods:
            c = curves[m]
            x = np.arange(1, c.shape[1] + 1)
            ax.plot(x, np.median(c, axis=0), label=m, lw=2.2 if m == "joint" else 1.3)
            ax.fill_between(x, c.min(axis=0), c.max(axis=0), alpha=0.15)
        ax.set(
            title=f"{study}: hypervolume vs trials ({args.seeds} seeds)",
            xlabel="trials",
            ylabel="hypervolume",
        )
        ax.legend()
    fig.tight_layout()
    out = args.out / "search_efficiency.png"
    fig.savefig(out, dpi=120)
    print(f"plot: {out}")
    print(
        "joint search beats every method run at its own budget"
        + (
            f" and reaches random's final hypervolume within {args.reach_within} trials"
            if args.reach_within
            else ""
        )
        + f" on every study: {'yes' if ok else 'NO'}"
    )
    return ok


if __name__ == "__main__":
    sys.exit(main())
