"""Embedding tables in a real-sized encoder: artifact bytes (and fidelity, latency) of the 6-layer,
hidden-384 BERT of ``studies/bert_encoder.yaml`` with its tables float, int8 and int4, beside ORT's own
``quantize_dynamic`` one-liner. Figures printed, not pass/fail; no study is run.

Artifacts (all lowered by the project's ONNX Runtime backend from ``compress`` with no fine-tuning,
except the last):

- float: the baseline (the fastest of the graph and its transformer-fused versions);
- int8 Linear (dynamic): int8 on every Linear, the tables float (what the study's int8 warm start was
  before tables were layers);
- + int8 tables / + int4 tables: the same with the word, position and token-type tables int8 (per-row
  scales) or int4 (GatherBlockQuantized);
- ORT quantize_dynamic: ``onnxruntime.quantization.quantize_dynamic`` on the float export (its int8
  ``Gather`` included).

Usage::

    python benchmarks/embedding_tables.py [--checkpoint DIR] [--eval-samples 16] [--no-timing]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from autocompress.backends import OnnxRuntimeBackend
from autocompress.backends.onnx_export import export_onnx
from autocompress.backends.onnxruntime import _quiet
from autocompress.examples.bert_encoder import bert_encoder
from autocompress.pipeline import compress
from autocompress.plan import LayerPlan, Plan
from autocompress.tasks.data import deployable


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=None, help="save_pretrained folder (default: a temporary one)")
    ap.add_argument("--eval-samples", type=int, default=16)
    ap.add_argument("--no-timing", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="ac-emb-") as d:
        tmp = Path(d)
        ckpt = args.checkpoint or str(tmp / "ckpt")
        task = bert_encoder(checkpoint=ckpt, train_samples=32, eval_samples=args.eval_samples)
        teacher = task.teacher()
        tables = {n: m for n, m in teacher.named_modules() if isinstance(m, nn.Embedding)}
        linears = [n for n, m in teacher.named_modules() if isinstance(m, nn.Linear)]
        table_bytes = sum(m.weight.numel() * 4 for m in tables.values())
        shapes = ", ".join(f"{n} {tuple(m.weight.shape)}" for n, m in tables.items())
        print(f"tables: {shapes}: {table_bytes:,} bytes")
        backend = OnnxRuntimeBackend(threads=1)
        ref = None
        if task.metric_obj.needs_reference:
            with torch.no_grad():
                ref = [deployable(teacher, task.io)(*x).numpy() for x, _ in task.eval_split.batches()]
        dyn = {n: LayerPlan(bits=8, quant_mode="dynamic") for n in linears}
        plans = {
            "float": {},
            "int8 Linear (dynamic), tables float": dyn,
            "int8 Linear (dynamic) + int8 tables": {**dyn, **{n: LayerPlan(bits=8) for n in tables}},
            "int8 Linear (dynamic) + int4 tables": {**dyn, **{n: LayerPlan(bits=4) for n in tables}},
        }
        arts = {}
        try:
            for label, layers in plans.items():
                out = compress(
                    task, teacher, Plan(layers=layers, epochs=0), reduce_range=backend.reduce_range
                )
                arts[label] = backend.lower(
                    deployable(out.model, task.io),
                    task.example_inputs(),
                    out.lowering,
                    tmp / label.replace(" ", "_"),
                    calibration=task.calibration_inputs() if out.lowering.quantized() else None,
                    io=task.io,
                )
            from onnxruntime.quantization import QuantType, quantize_dynamic

            export_onnx(deployable(teacher, task.io), task.example_inputs(), tmp / "f32.onnx", io=task.io)
            ort_path = tmp / "ort_dynamic" / "model.onnx"
            ort_path.parent.mkdir()
            with _quiet():
                quantize_dynamic(str(tmp / "f32.onnx"), str(ort_path), weight_type=QuantType.QInt8)
            arts["ORT quantize_dynamic"] = backend.load_artifact(ort_path)
            base = os.path.getsize(arts["float"].path)
            timing = {}
            if not args.no_timing:
                others = [a for k, a in arts.items() if k != "float"]
                pairs = backend.measure_group(others, arts["float"], task.example_inputs())
                timing = {k: s for k, (s, _) in zip([k for k in arts if k != "float"], pairs, strict=True)}
                timing["float"] = pairs[0][1]
            for label, art in arts.items():
                size = os.path.getsize(art.path)
                fid = backend.evaluate(art, task.eval_split.batches(), task.metric_obj, ref)
                ms = f", {timing[label].median_ms:.1f} ms" if label in timing else ""
                print(
                    f"{label:40s} {size / 1e6:6.1f} MB ({base / size:4.2f}x smaller){ms}, fidelity {fid:.4f}"
                )
        finally:
            backend.close()


if __name__ == "__main__":
    main()
