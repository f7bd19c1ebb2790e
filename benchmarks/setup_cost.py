"""Set-up cost before the first trial, with and without structural roles (search/roles.py).

Opens a study's run folder (teacher, baseline, trial estimate), then runs the applicability check and the
latency profile twice on the same context: every layer checked and profiled itself (``share_roles``
False: the behaviour before roles), and once per structural role. Prints, for each: wall seconds,
compress + forward runs, lowerings, profile rows measured / copied / over the budget. The profile keeps
the run's budget (2 trial-equivalents of the run's per-trial estimate) unless ``--no-budget``.

    python benchmarks/setup_cost.py                                # BERT encoder, 6 layers x 128
    python benchmarks/setup_cost.py --study studies/mnist1d_transformer.yaml --set task.options.depth=6
    python benchmarks/setup_cost.py --tiny-encoder                 # applicability, 1 vs 4 identical layers
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _shared import fresh_run  # noqa: E402

# a config-initialized BERT (the example's factory) at a size that profiles in minutes on 2 cores
BERT = {
    "task.options": {
        "checkpoint": "runs/_checkpoints/bert_encoder_h128",
        "layers": 6,
        "hidden": 128,
        "heads": 4,
        "intermediate": 512,
        "seq_len": 64,
        "train_samples": 64,
        "eval_samples": 64,
    },
    "space.overrides": {},  # the default space, layer by layer (a space file named by its path)
    "trials.eval_samples": None,
}


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def tiny_encoder() -> None:
    """Applicability of the default space on ``TinyTransformer`` (dim 16) with 1 and 4 encoder layers."""
    import torch

    from autocompress.backends import OnnxRuntimeBackend
    from autocompress.inventory import build_inventory
    from autocompress.search.applicability import check_applicability
    from autocompress.space import SearchSpace
    from autocompress.tasks import Task
    from autocompress.testing.models import TinyTransformer

    backend = OnnxRuntimeBackend()
    try:
        for depth in (1, 4):

            def fn(depth=depth):
                return TinyTransformer(length=40, patch=4, dim=16, depth=depth, heads=2)

            torch.manual_seed(0)
            x = torch.randn(64, 40)
            with torch.no_grad():
                y = fn().eval()(x).argmax(1)
            task = Task(
                name="enc", model_fn=fn, train=(x[:48], y[:48]), test=(x[48:], y[48:]), teacher_epochs=0
            )
            torch.manual_seed(1)
            teacher = fn().eval()
            inv = build_inventory(teacher, task.example_inputs())
            for share in (False, True):
                space = SearchSpace.from_file(
                    Path(__file__).resolve().parents[1] / "autocompress/search_spaces/default.yaml"
                )
                t0 = time.perf_counter()
                r = check_applicability(task, teacher, inv, space, backend, share_roles=share)
                print(
                    f"depth {depth}, {'per role ' if share else 'per layer'}: {len(inv)} layers, "
                    f"{r.applies} compress+forward, {r.lowerings} lowerings, {len(r.checks)} pairs, "
                    f"{len(r.excluded)} excluded, {time.perf_counter() - t0:.1f} s"
                )
    finally:
        backend.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study", default="studies/bert_encoder.yaml")
    ap.add_argument("--set", action="append", default=[], help="dotted.key=value (JSON) overrides")
    ap.add_argument("--no-budget", action="store_true", help="profile every row (no trial-equivalent budget)")
    ap.add_argument("--tiny-encoder", action="store_true", help="applicability only, 1 vs 4 identical layers")
    args = ap.parse_args(argv)
    if args.tiny_encoder:
        tiny_encoder()
        return 0
    overrides = dict(BERT) if args.study.endswith("bert_encoder.yaml") else {}
    overrides.update({"trials.warm_start": [], "trials.planned_starts": 0})
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = _value(value)
    from autocompress.search import open_run
    from autocompress.search.applicability import check_applicability
    from autocompress.search.latency_profile import measure_profile

    cfg, folder = fresh_run(args.study, "ac-setup-cost-", overrides)
    try:
        with open_run(cfg, log=lambda s: None) as (ctx, _):
            trial_s = None if args.no_budget else (ctx.trial_estimate or {}).get("total")
            print(f"{cfg.name}: {len(ctx.inventory)} layers; per-trial estimate {trial_s or 0:.1f} s")
            for share in (False, True):
                t0 = time.perf_counter()
                app = check_applicability(
                    ctx.task,
                    ctx.teacher,
                    ctx.inventory,
                    ctx.space,
                    ctx.backend,
                    seed=cfg.seed,
                    share_roles=share,
                )
                app_s = time.perf_counter() - t0
                prof = measure_profile(
                    ctx, log=lambda s: None, trial_s=trial_s, use_cache=False, share_roles=share
                )
                rows = len(prof["rows"])
                measured = rows - prof["skipped"] - prof["shared"]
                print(
                    f"  {'per role ' if share else 'per layer'}: applicability {app_s:.1f} s "
                    f"({app.applies} compress+forward, {app.lowerings} lowerings, {len(app.checks)} pairs); "
                    f"profile {prof['seconds']:.1f} s ({prof['lowerings']} lowerings, {rows} rows: {measured} "
                    f"measured, {prof['shared']} from their role, {prof['skipped']} over budget; "
                    f"{prof['roles']} roles); together {app_s + prof['seconds']:.1f} s"
                )
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
