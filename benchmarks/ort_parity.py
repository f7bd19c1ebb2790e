"""Is the project's ONNX Runtime lowering as good as ORT's own tools? Figures printed, not pass/fail.

1. int8: autocompress's int8-everywhere artifact vs ORT's ``quantize_static`` one-liner (QDQ, per-channel,
   reduce_range where the CPU lacks VNNI) on the same float model: QuantizeLinear / DequantizeLinear
   left after ORT's optimizer, and the latencies of both and of the float artifact, timed interleaved.
   Models: the quickstart CNN (digits, width 64, 8x8) and a ResNet-style CNN (width 32, 3x32x32).
2. float: :func:`autocompress.backends.ort_fusions.optimize_float` on a 6-layer, hidden-384, 12-head BERT
   encoder (vocabulary 1000, sequence 128, batch 1): which transformer fusions apply, each variant's
   latency beside the unfused graph's, which one is kept.

Usage::

    python benchmarks/ort_parity.py [--repeats 3] [--skip-bert]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import warnings
from collections import Counter
from pathlib import Path

import onnx
import torch

from autocompress.backends import OnnxRuntimeBackend
from autocompress.backends.base import time_callables
from autocompress.backends.onnxruntime import _Calibration, _quiet, make_session
from autocompress.backends.ort_fusions import optimize_float
from autocompress.inventory import compressible_layers
from autocompress.tasks import load_task
from autocompress.techniques import fold_batchnorm
from autocompress.testing import ResNetStyle


def _trained_like(model: torch.nn.Module) -> torch.nn.Module:
    """BN statistics of a trained net (distinct, non-zero folded biases), then folded."""
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return fold_batchnorm(model.eval())[0]


def _qdq_counts(path: Path, tmp: Path) -> str:
    make_session(path, 1, tmp / "opt.onnx")
    ops = Counter(n.op_type for n in onnx.load(str(tmp / "opt.onnx")).graph.node)
    return f"{ops['QuantizeLinear']} Q + {ops['DequantizeLinear']} DQ"


def int8_parity(name: str, model: torch.nn.Module, x: torch.Tensor, repeats: int) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        be = OnnxRuntimeBackend()
        f32 = be.lower(copy.deepcopy(model), (x[:1],), {}, tmp / "f32")
        bits = {n: 8 for n, _ in compressible_layers(model)}
        ours = be.lower(copy.deepcopy(model), (x[:1],), bits, tmp / "ours", x.numpy())
        theirs = tmp / "ort.onnx"
        with _quiet():
            quantize_static(
                str(f32.path),
                str(theirs),
                _Calibration(x.numpy()),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                reduce_range=be.reduce_range,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
            )
        print(
            f"{name}: after ORT's optimizer, autocompress {_qdq_counts(ours.path, tmp)}, "
            f"quantize_static {_qdq_counts(theirs, tmp)}"
        )
        feed = {"input": x[:1].numpy()}
        sessions = [make_session(p, 1) for p in (ours.path, theirs, f32.path)]
        fns = [lambda s=s: s.run(None, feed) for s in sessions]
        for _ in range(repeats):
            a, b, c = time_callables(fns, device="cpu", batch_size=1, min_s=1.0, max_s=6.0)
            print(
                f"  autocompress {a.median_ms:.3f} ms, quantize_static {b.median_ms:.3f} ms, float "
                f"{c.median_ms:.3f} ms: autocompress at {b.median_ms / a.median_ms:.3f}x quantize_static's "
                f"speed; speedups over float {c.median_ms / a.median_ms:.2f}x vs {c.median_ms / b.median_ms:.2f}x "
                f"(disturbed {a.disturbed:.0%})"
            )


def bert_fusions(repeats: int) -> None:
    import transformers

    cfg = transformers.BertConfig(
        vocab_size=1000,
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=12,
        intermediate_size=1536,
        max_position_embeddings=128,
    )
    cfg._attn_implementation = "eager"

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = transformers.BertModel(cfg).eval()

        def forward(self, input_ids, attention_mask):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    torch.manual_seed(0)
    ids, mask = torch.randint(0, 1000, (1, 128)), torch.ones(1, 128, dtype=torch.long)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "bert.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                Encoder().eval(),
                (ids, mask),
                str(path),
                dynamo=False,
                opset_version=17,
                input_names=["input_ids", "attention_mask"],
                output_names=["hidden"],
            )
        feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
        for _ in range(repeats):
            kept, report = optimize_float(
                path, num_heads=12, hidden_size=384, feed=feed, out_dir=Path(d) / "f"
            )
            timed = ", ".join(f"{n} {c['latency_ms']:.1f} ms" for n, c in report["candidates"].items())
            print(
                f"BERT 6x384, seq 128: unfused {report['unfused_ms']:.1f} ms, {timed}; kept "
                f"{report['variant']} ({report['decision']}); fusions {report['candidates']['all']['fusions']}"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-bert", action="store_true")
    args = ap.parse_args()
    task = load_task("digits", {"width": 64, "teacher_epochs": 1})
    int8_parity(
        "quickstart CNN (digits, width 64)", _trained_like(task.model_fn()), task.train[0][:256], args.repeats
    )
    torch.manual_seed(1)
    int8_parity(
        "ResNet-style CNN (width 32, 3x32x32)",
        _trained_like(ResNetStyle(32)),
        torch.rand(256, 3, 32, 32),
        args.repeats,
    )
    if not args.skip_bert:
        bert_fusions(args.repeats)


if __name__ == "__main__":
    main()
