"""Seconds of bias correction in one ONNX Runtime lowering of the ImageNet MobileNetV2 fine-tuned on MNIST:
the whole model at int8, the depthwise convs, the 1x1 expansion convs, one conv; with and without it.

Needs the cached checkpoint (``python benchmarks/real_models.py --setup``).

    python benchmarks/bias_correction_cost.py [--root runs/_checkpoints]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import autocompress.backends.ort_quantize as oq  # noqa: E402
from autocompress.config import StudyConfig  # noqa: E402
from autocompress.examples.pretrained import mnist_classifier  # noqa: E402
from autocompress.inventory import compressible_layers  # noqa: E402
from autocompress.pipeline import compress  # noqa: E402
from autocompress.plan import LayerPlan, Plan  # noqa: E402
from autocompress.rundir import build_backend  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default=str(ROOT / "runs" / "_checkpoints"), help="the cache folder")
    args = p.parse_args()
    torch.set_num_threads(1)
    task = mnist_classifier(arch="mobilenet_v2", root=args.root, eval_samples=200, train_samples=512)
    teacher = task.teacher().eval()
    backend = build_backend(StudyConfig.model_validate({"name": "bc", "task": {"name": "digits"}}))
    spent: list[tuple[int, float]] = []
    real = oq.correct_biases

    def timed(*a):
        t = time.perf_counter()
        n = real(*a)
        spent.append((n, time.perf_counter() - t))
        return n

    oq.correct_biases = timed
    convs = {n: m for n, m in compressible_layers(teacher) if isinstance(m, torch.nn.Conv2d)}
    sets = {
        "all 8-bit": [n for n, _ in compressible_layers(teacher)],
        "depthwise convs": [n for n, m in convs.items() if m.groups > 1],
        "1x1 expansion convs": [
            n for n, m in convs.items() if m.groups == 1 and m.kernel_size == (1, 1) and n.endswith(".0.0")
        ],
        "one conv (features.0.0)": ["features.0.0"],
    }
    with tempfile.TemporaryDirectory() as tmp:
        for label, names in sets.items():
            plan = Plan(layers={n: LayerPlan(bits=8) for n in names}, epochs=0)
            out = compress(task, teacher, plan, reduce_range=backend.reduce_range)
            for on in (True, False):
                spent.clear()
                t = time.perf_counter()
                backend.lower(
                    out.model,
                    task.example_inputs(),
                    replace(out.lowering, bias_correction=on),
                    Path(tmp) / f"{len(names)}-{on}",
                    calibration=task.calibration_inputs(),
                )
                total = time.perf_counter() - t
                print(
                    f"{label}: {len(names)} layers, bias_correction={on}: lowering {total:.1f} s, of which "
                    f"correction {sum(s for _, s in spent):.1f} s ({sum(n for n, _ in spent)} convs)",
                    flush=True,
                )
    backend.close()


if __name__ == "__main__":
    main()
