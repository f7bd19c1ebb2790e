"""The depthwise-separable substitution alone, measured: every standard kxk conv of a model replaced by a
depthwise kxk + a pointwise 1x1 conv (multiplier 1, SVD initialisation), on the ResNet-style and the
MobileNet-style reference models and on the ResNet-18 of ``autocompress/studies/resnet18.yaml``.

For each model it prints, against the float baseline (BatchNorm folded, the same backend): the MACs of
the substituted convs, the artifact's size, its latency (onnxruntime CPU, batch 1, 1 thread; the pair
timed side by side in alternating blocks, ``Backend.measure_pair``), and the metric (the task's, on the
artifact) right after the substitution and after a short KD fine-tune (``--steps`` optimizer steps).
Then a small study on the ResNet-style model with ``separable`` and ``bits`` in its space (warm starts
include the substitution) says whether the substitution is on the feasible front.

    python benchmarks/depthwise_separable.py [--models resnet,mobilenet,resnet18] [--steps 100]
        [--trials 6] [--no-study]

``--models ''`` runs the study alone. Each teacher is trained once and kept under ``runs/_checkpoints/``.

The ResNet-18's checkpoint is trained on first use (``runs/_checkpoints/resnet18.safetensors``, 3 epochs
on the digits, a few minutes on 2 cores).
The reference models are trained here on the same digits as the ResNet-18 (tinted, 3 x 32 x 32, 10 epochs).
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from autocompress.backends import OnnxRuntimeBackend
from autocompress.pipeline import compress
from autocompress.plan import LayerPlan, Plan
from autocompress.techniques.depthwise_separable import separable_macs, why_not_separable

CHECKPOINTS = Path("runs/_checkpoints")
TEACHER_EPOCHS = 10  # the reference models' training on the digits (batch 32, Adam 3e-3, cosine)
RESNET18 = {
    "checkpoint": "runs/_checkpoints/resnet18.safetensors",
    "image_size": 64,
    "width": 64,
    "epochs": 3,
}


@functools.cache
def make_task(name: str):
    """``(task, teacher)``: the study's ResNet-18 (its checkpoint), or a reference model trained here on the
    same tinted digits at 32 x 32 (:data:`TEACHER_EPOCHS`), the task holding the trained teacher."""
    from autocompress import Task

    if name == "resnet18":
        from autocompress.examples.resnet18 import resnet18_task

        task = resnet18_task(**RESNET18)
        return task, task.model.eval()
    from autocompress.examples.resnet18 import splits
    from autocompress.testing import REFERENCE_MODELS
    from autocompress.training import train_teacher

    train, test = (d.tensors for d in splits(32, seed=0))
    cls = REFERENCE_MODELS[name]
    path = CHECKPOINTS / f"depthwise_separable_{name}.safetensors"  # trained once, reused by later runs
    if path.exists():
        teacher = cls()
        teacher.load_state_dict(load_file(str(path)))
    else:
        task = Task(
            name=name,
            model_fn=cls,
            train=train,
            test=test,
            teacher_epochs=TEACHER_EPOCHS,
            batch_size=32,
            lr=3e-3,
        )
        teacher = train_teacher(task)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in teacher.state_dict().items()}, str(path))
    teacher.eval()
    return Task(name=name, model=teacher, train=train, test=test, batch_size=64), teacher


def eligible(teacher: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in teacher.named_modules() if why_not_separable(m, 1) is None}


def score(be, art, task) -> float:
    ref = None
    if task.metric_obj.needs_reference:
        raise SystemExit("the benchmark's tasks score against labels")
    return be.evaluate(art, task.eval_split.batches(), task.metric_obj, ref)


def measure_model(name: str, steps: int, be, tmp: Path) -> dict:
    """Baseline, substituted (post-training) and substituted + KD: metric, size; latency side by side."""
    task, teacher = make_task(name)
    convs = eligible(teacher)
    macs = [separable_macs(m, 1) for m in convs.values()]
    layers = {n: LayerPlan(separable=1) for n in convs}
    x = task.example_inputs(1)
    arts, scores, train_s = {}, {}, 0.0
    for key, plan in (
        ("baseline", Plan(epochs=0)),
        ("separable", Plan(layers=layers, epochs=0)),
        ("separable+KD", Plan(layers=layers, steps=steps, lr=1e-3, kd_temperature=4.0, kd_alpha=0.5)),
    ):
        out = compress(task, teacher, plan, batch_size=32, threads=2)
        train_s += out.train_s
        arts[key] = be.lower(out.model, x, out.lowering, tmp / f"{name}-{key.replace('+', '_')}", io=task.io)
        scores[key] = score(be, arts[key], task)
    torch.set_num_threads(1)
    sub, base = be.measure_pair(arts["separable"], arts["baseline"], x)
    return {
        "name": name,
        "convs": len(convs),
        "macs": (sum(a for a, _ in macs), sum(b for _, b in macs)),
        "size": (arts["baseline"].size_bytes, arts["separable"].size_bytes),
        "latency": (base.median_ms, sub.median_ms, base.n, sub.n),
        "scores": scores,
        "train_s": train_s,
        "steps": steps,
    }


def print_row(r: dict) -> None:
    (m0, m1), (s0, s1), (l0, l1, n0, n1) = r["macs"], r["size"], r["latency"]
    sc = r["scores"]
    print(f"\n{r['name']}: {r['convs']} convs substituted (multiplier 1)")
    print(f"  MACs of those convs  {m0:>12,d} -> {m1:>12,d}  per output position ({m1 / m0:.3f}x)")
    print(f"  artifact bytes       {s0:>12,d} -> {s1:>12,d}  ({s1 / s0:.3f}x)")
    print(
        f"  latency ms           {l0:>12.4f} -> {l1:>12.4f}  speedup {l0 / l1:.2f}x (n={n0}/{n1}, side by side)"
    )
    print(f"  accuracy baseline    {sc['baseline']:.4f}")
    print(f"  after substitution   {sc['separable']:.4f}  drop {sc['baseline'] - sc['separable']:+.4f}")
    print(
        f"  after {r['steps']} KD steps   {sc['separable+KD']:.4f}  drop {sc['baseline'] - sc['separable+KD']:+.4f}"
        f"  (fine-tune {r['train_s']:.0f} s)"
    )


def study_yaml(folder: Path, trials: int, steps: int) -> Path:
    """A small study on the ResNet-style model: float or int8, substituted or not, per group of layers."""
    folder.mkdir(parents=True, exist_ok=True)
    empty = folder / "empty_space.yaml"
    empty.write_text("{}\n")
    space = {
        "bits": {"choices": [8, 32]},
        "separable": {"choices": [0, 1]},
        "kd": {"temperature": {"fixed": 4.0}, "alpha": {"fixed": 0.5}},
        # the 1x1 shortcut cannot be substituted: a group of its own keeps the choice for the 3x3 convs
        "groups": {
            "stem": "stem\\.0",
            "layer1": "layer1\\..*conv.",
            "layer2": "layer2\\..*conv.",
            "rest": ".*",
        },
    }
    study = {
        "name": "depthwise_separable_resnet",
        "task": {},
        "space": {"file": str(empty), "overrides": space},
        "finetune": {"steps": steps, "lr": 0.001, "batch_size": 32, "threads": 2},
        "backend": {"name": "onnxruntime", "device": "cpu", "batch_size": 1, "threads": 1},
        "budgets": {"max_metric_drop": 0.05},
        "sampler": {"name": "tpe", "options": {"n_startup_trials": 3, "multivariate": True}},
        "trials": {
            "n": trials,
            "planned_starts": 0,
            "warm_start": [{"bits": 8}, {"separable": 1}, {"separable": 1, "bits": 8}],
        },
        "seed": 0,
        "output": str(folder / "run"),
    }
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def run_small_study(trials: int, steps: int, tmp: Path) -> None:
    from autocompress import load_config, run_study

    t0 = time.perf_counter()
    result = run_study(
        load_config(study_yaml(tmp, trials, steps)), task=make_task("resnet")[0], log=lambda s: None
    )
    print(
        f"\nstudy: ResNet-style, {result.completed} trials ({time.perf_counter() - t0:.0f} s), space bits {{8, 32}}"
    )
    print("  x separable {0, 1} per group (stem, layer1, layer2); feasible front (metric drop <= 0.05):")
    on_front = False
    for m in result.front:
        layers = m.plan.layers if m.plan is not None else {}
        sep = sorted(n for n, lp in layers.items() if lp.separable > 0)
        bits = sorted({lp.bits for lp in layers.values()})
        on_front |= bool(sep)
        print(
            f"  trial {m.trial:>2}: accuracy {m.metric:.4f}  speedup {m.speedup:.2f}x  size {m.size_ratio:.2f}x"
            f"  bits {bits}  separable layers {len(sep)}"
        )
    print(f"  the substitution is {'ON' if on_front else 'NOT on'} the front")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet,mobilenet,resnet18")
    ap.add_argument("--steps", type=int, default=100, help="KD fine-tune steps (batch 32)")
    ap.add_argument("--trials", type=int, default=6)
    ap.add_argument("--no-study", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    be = OnnxRuntimeBackend(batch_size=1, threads=1)
    try:
        with tempfile.TemporaryDirectory(prefix="ac-dws-") as tmp:
            for name in filter(None, args.models.split(",")):
                print_row(measure_model(name, args.steps, be, Path(tmp)))
            if not args.no_study:
                run_small_study(args.trials, args.steps, Path(tmp) / "study")
    finally:
        be.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
