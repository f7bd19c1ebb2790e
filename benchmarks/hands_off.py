"""Hands-off studies on autocompress.testing's reference models: a 12-trial study from a study file with
no warm_start, no space and no fine-tune settings (planned starts from the measured profiles, the default
space and fine-tune length chosen from the model), against a 60-trial random search of the same space.

Per model it prints the 12-trial front's best speedup at <= 1% metric drop, the random search's, the
profile's cost in trial-equivalents, and the failed trials. The data ship with installed packages (no
download): scikit-learn's digits for the CNNs (upsampled to their input size, 3 channels) and the LSTM
(8 rows of 8 pixels), MNIST-1D for the transformer; the teacher is trained in each run folder.

Exits 1 when the issue's figure is missed: a trial of the 12-trial study failed, the profile cost 3
trial-equivalents or more, or the random search found a model >= 1.3x faster at <= 1% drop and the
12-trial front has none.

    python benchmarks/hands_off.py                      # all five models, 12 vs 60 trials
    python benchmarks/hands_off.py --models plain_cnn --trials 4 --random-trials 4 --teacher-epochs 3 \\
        --quick-timing --finetune-steps 10              # a smoke run (changes the study: not the figure)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("plain_cnn", "resnet", "mobilenet", "torch_transformer", "lstm")
SPEEDUP, DROP = 1.3, 0.01


def _data(model: str, seed: int):
    """(train, test) of real data in the reference model's input shape: digits (scikit-learn) upsampled to
    the CNNs' size and repeated to 3 channels, digits rows as 8 steps of 8 features for the LSTM, MNIST-1D
    signals (length 40) for the transformer."""
    from autocompress.tasks.digits import _split
    from autocompress.tasks.mnist1d import _dataset
    from autocompress.testing import REFERENCE_MODELS

    if model == "torch_transformer":
        x, y, x_test, y_test = _dataset(4000, seed)
        return (x, y), (x_test, y_test)
    train, test = _split(seed)
    if model == "lstm":
        return (train[0][:, 0], train[1]), (test[0][:, 0], test[1])
    size = REFERENCE_MODELS[model].example_inputs(1)[0].shape[-1]

    def shaped(x):
        return torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear").repeat(1, 3, 1, 1)

    return (shaped(train[0]), train[1]), (shaped(test[0]), test[1])


def task(model: str = "plain_cnn", seed: int = 0, teacher_epochs: int = 15):
    """The task of one reference model (``module:factory`` of the study files below), trained in the run."""
    from autocompress.tasks import Task
    from autocompress.testing import REFERENCE_MODELS

    train, test = _data(model, seed)
    return Task(
        name=model, model_fn=REFERENCE_MODELS[model], train=train, test=test, teacher_epochs=teacher_epochs
    )


def study_file(folder: Path, model: str, args, random_search: bool) -> Path:
    """The study: only the task, the backend and the budgets (plus the random search's own settings)."""
    data = {
        "name": f"{model}-{'random' if random_search else 'hands-off'}",
        "task": {
            "name": "hands_off:task",
            "options": {"model": model, "teacher_epochs": args.teacher_epochs},
        },
        "backend": {"name": "onnxruntime"},
        "budgets": {"max_metric_drop": DROP},
        "trials": {"n": args.random_trials if random_search else args.trials},
        "output": str(folder / ("random" if random_search else "hands_off")),
    }
    if random_search:
        data["sampler"] = {"name": "random"}
        data["trials"].update(warm_start=[], planned_starts=0)
    if args.quick_timing:
        data["backend"]["options"] = {"timing": {"warmup_s": 0.05, "min_s": 0.1, "max_s": 0.5}}
    if args.finetune_steps is not None:
        data["finetune"] = {"steps": args.finetune_steps}
    path = folder / f"{data['name']}.yaml"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def best_speedup(study) -> float | None:
    """The front's fastest model within the drop (None: no model within it)."""
    ok = [t.user_attrs["speedup"] for t in study.best_trials if t.user_attrs.get("metric_drop", 1.0) <= DROP]
    return max(ok, default=None)


def run_one(model: str, args) -> dict:
    from optuna.trial import TrialState

    from autocompress.config import load_config
    from autocompress.search import run_study

    folder = Path(args.out) / model
    out = {"model": model, "random": None, "random_s": 0.0, "random_failed": []}
    for random_search in [False] + ([True] if args.random_trials else []):  # 0: no random search
        t0 = time.perf_counter()
        cfg = load_config(study_file(folder, model, args, random_search))
        study = run_study(cfg, log=(print if args.verbose else lambda s: None)).study
        key = "random" if random_search else "hands_off"
        out[key] = best_speedup(study)
        out[f"{key}_s"] = time.perf_counter() - t0
        failed = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
        out[f"{key}_failed"] = [t.user_attrs.get("fail_reason", "") for t in failed]
        if not random_search:
            profile = study.user_attrs.get("latency_profile") or {}
            out["profile_te"] = profile.get("trial_equivalents")
            out["profile_s"] = profile.get("seconds")
    return out


def _fmt(v) -> str:
    return "none" if v is None else f"{v:.2f}x"


def verdict(r: dict) -> list[str]:
    """What misses the issue's figure for one model (empty: nothing)."""
    bad = []
    if r["hands_off_failed"]:
        bad.append(f"{len(r['hands_off_failed'])} trials failed: {r['hands_off_failed'][0]}")
    if r["profile_te"] is not None and r["profile_te"] >= 3:
        bad.append(f"the profile cost {r['profile_te']:.2f} trial-equivalents (limit 3)")
    if (r["random"] or 0) >= SPEEDUP and (r["hands_off"] or 0) < SPEEDUP:
        bad.append(
            f"random search found {_fmt(r['random'])} at <= {DROP:.0%}, the planned study {_fmt(r['hands_off'])}"
        )
    return bad


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--random-trials", type=int, default=60, help="0: no random search to compare with")
    ap.add_argument("--teacher-epochs", type=int, default=15)
    ap.add_argument("--quick-timing", action="store_true", help="short timing rounds (smoke runs)")
    ap.add_argument("--finetune-steps", type=int, default=None, help="smoke runs only: fixes the fine-tune")
    ap.add_argument("--out", default=str(ROOT / "runs" / "hands_off"))
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args()
    if args.trials < 1 or args.random_trials < 0:
        ap.error("--trials must be >= 1 and --random-trials >= 0")
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # the studies' task: hands_off:task
    misses = 0
    print(
        f"model              {args.trials}-trial front  {args.random_trials}-trial random  profile  failed  wall"
    )
    for model in args.models:
        r = run_one(model, args)
        te = "n/a" if r["profile_te"] is None else f"{r['profile_te']:.2f} te"
        print(
            f"{model:18s} {_fmt(r['hands_off']):>14s}  "
            f"{_fmt(r['random']) if args.random_trials else 'not run':>16s}  {te:>7s}  "
            f"{len(r['hands_off_failed']):>6d}  {r['hands_off_s']:.0f} s + {r['random_s']:.0f} s",
            flush=True,
        )
        for line in verdict(r):
            print(f"  MISSED: {line}")
            misses += 1
    print(f"best speedup at <= {DROP:.0%} metric drop on each front; profile cost in trial-equivalents")
    return 1 if misses else 0


if __name__ == "__main__":
    sys.exit(main())
