"""Where dynamic int8 loses all-mpnet-base-v2's fidelity, and what the lowering's outlier check gives.

Two parts, on the cached checkpoint and BBC News of ``benchmarks/real_models.py --setup``:

* ``--diagnose``: a fake-quantized torch model (int8 weights per output channel, inputs quantized per
  tensor as ``DynamicQuantizeLinear`` does, per batch of 16) with one group of Linear layers int8 at a
  time: fidelity (mean cosine to the float model's embeddings) per layer kind and per block.
* default: the ONNX Runtime artifacts side by side: the float baseline (ORT-optimized), autocompress's
  int8 dynamic everywhere (+ int8 tables) with the outlier check and without it, and ORT's
  ``quantize_dynamic`` one-liner: fidelity on the eval articles (every 4th of the eval split) and
  latency (batch 1, sequence 128, 1 thread, alternating blocks in one process).

    python benchmarks/mpnet_dynamic_int8.py --diagnose
    python benchmarks/mpnet_dynamic_int8.py --rounds 4
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from autocompress.backends import ort_quantize as oq  # noqa: E402
from autocompress.backends.onnx_export import default_io, export_onnx, graph_input_names  # noqa: E402
from autocompress.backends.onnxruntime import OnnxRuntimeBackend  # noqa: E402
from autocompress.examples.pretrained import MPNET, bbc_samples, load_sentence_encoder  # noqa: E402
from autocompress.lowering import LayerLowering, LoweringSpec  # noqa: E402

KINDS = {"q": "attn.q", "k": "attn.k", "v": "attn.v", "o": "attn.o"}
KINDS.update({"ffn_in": "intermediate.dense", "ffn_out": "output.dense"})


def arrays(samples) -> tuple[np.ndarray, np.ndarray]:
    ids = np.stack([s["input_ids"].numpy() for s in samples])
    return ids, np.stack([s["attention_mask"].numpy() for s in samples])


def embed(model, data, batch: int = 16) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat(
            [
                model(torch.from_numpy(data[0][i : i + batch]), torch.from_numpy(data[1][i : i + batch]))
                for i in range(0, len(data[0]), batch)
            ]
        )


def fake_dynamic(x: torch.Tensor) -> torch.Tensor:
    """``x`` through DynamicQuantizeLinear + dequantization (per tensor, uint8)."""
    lo, hi = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
    scale = (hi - lo) / 255.0 if hi > lo else 1.0
    zero = round(-lo / scale)
    return (torch.clamp(torch.round(x / scale) + zero, 0, 255) - zero) * scale


def diagnose(model, data) -> None:
    """Fidelity with one group of Linear layers int8 dynamic at a time (fake-quantized)."""
    ref = embed(model, data)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    weights = {n: m.weight.data.clone() for n, m in linears.items()}

    def fidelity(group: set[str], per_channel: bool = True, activations: bool = True) -> float:
        hooks = []
        for name, mod in linears.items():
            w = weights[name]
            if name in group:
                amax = w.abs().amax(1, keepdim=True) if per_channel else w.abs().max()
                scale = amax / 127
                mod.weight.data.copy_(torch.round(w / scale).clamp(-127, 127) * scale)
                if activations:
                    hooks.append(mod.register_forward_pre_hook(lambda _m, a: (fake_dynamic(a[0]),)))
            else:
                mod.weight.data.copy_(w)
        try:
            return torch.nn.functional.cosine_similarity(embed(model, data), ref, dim=1).mean().item()
        finally:
            for h in hooks:
                h.remove()
            for name, mod in linears.items():
                mod.weight.data.copy_(weights[name])

    every = set(linears)
    rows = [
        ("every Linear (int8 weights per channel, inputs per tensor)", fidelity(every)),
        ("every Linear, weights only", fidelity(every, activations=False)),
        ("every Linear, weights per tensor", fidelity(every, per_channel=False)),
    ]
    for kind, suffix in KINDS.items():
        rows.append((f"{kind} of every block", fidelity({n for n in every if n.endswith(suffix)})))
    ffn_out = {n for n in every if n.endswith(KINDS["ffn_out"])}
    for b in range(12):
        rows.append((f"ffn_out of block {b} only", fidelity({n for n in ffn_out if f"layer.{b}." in n})))
    late = {n for n in ffn_out if int(re.search(r"layer\.(\d+)\.", n).group(1)) in range(6, 11)}
    rows.append(("every Linear but ffn_out of blocks 6-10", fidelity(every - late)))
    for label, value in rows:
        print(f"| {label} | {value:.4f} |", flush=True)


def side_by_side(model, data, calibration, rounds: int, tmp: Path) -> None:
    """The ORT artifacts' fidelity and latency, timed in alternating blocks."""
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    ref = embed(model, data).numpy()
    example = (torch.from_numpy(data[0][:1]), torch.from_numpy(data[1][:1]))
    backend = OnnxRuntimeBackend("cpu")
    layers = {
        n: LayerLowering(8, "dynamic") for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
    }
    layers.update(
        {n: LayerLowering(8) for n, m in model.named_modules() if isinstance(m, torch.nn.Embedding)}
    )
    spec = LoweringSpec(layers)
    fp32 = tmp / "float.onnx"
    export_onnx(model, example, fp32, io=default_io(2))
    names = graph_input_names(fp32)
    baseline = backend.lower(model, example, LoweringSpec(), tmp / "f", io=default_io(2))
    paths = {"float baseline (ORT-optimized)": baseline.path}
    art = backend.lower(model, example, spec, tmp / "checked", calibration=calibration, io=default_io(2))
    print(
        f"kept float by the outlier check (channel-averaged input SQNR, dB): {art.meta['dynamic_kept_float']}"
    )
    paths["autocompress int8 dynamic everywhere, outlier check"] = art.path
    checked = oq.outlier_layers
    oq.outlier_layers = lambda *a, **k: {}
    try:
        paths["autocompress int8 dynamic everywhere, no check"] = backend.lower(
            model, example, spec, tmp / "unchecked", calibration=calibration, io=default_io(2)
        ).path
    finally:
        oq.outlier_layers = checked
    quantize_dynamic(str(fp32), str(tmp / "oneliner.onnx"), weight_type=QuantType.QInt8)
    paths["ORT quantize_dynamic one-liner"] = tmp / "oneliner.onnx"
    backend.close()
    sessions = {}
    for label, path in paths.items():
        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        sessions[label] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    one = {names[0]: data[0][:1], names[1]: data[1][:1]}
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for s in sessions.values():
        s.run(None, one)
    for _ in range(rounds):
        for label, s in sessions.items():
            for _ in range(8):
                start = time.perf_counter()
                s.run(None, one)
                times[label].append(time.perf_counter() - start)
    base = statistics.median(times["float baseline (ORT-optimized)"])
    print("| answer | fidelity | min cosine | ms | speedup | MB |\n|---|---|---|---|---|---|")
    for label, s in sessions.items():
        out = np.concatenate(
            [
                s.run(None, {names[0]: data[0][i : i + 16], names[1]: data[1][i : i + 16]})[0]
                for i in range(0, len(data[0]), 16)
            ]
        )
        cos = (out * ref).sum(1) / np.linalg.norm(out, axis=1) / np.linalg.norm(ref, axis=1)
        med = statistics.median(times[label])
        mb = Path(paths[label]).stat().st_size / 1e6
        print(
            f"| {label} | {cos.mean():.4f} | {cos.min():.4f} | {med * 1e3:.1f} | {base / med:.2f}x | {mb:.1f} |"
        )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(ROOT / "runs" / "_checkpoints"), help="the cache folder")
    parser.add_argument("--diagnose", action="store_true", help="the fake-quantized per-group fidelities")
    parser.add_argument("--rounds", type=int, default=4, help="alternating timing blocks (8 calls each)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    train, evaluation, _, _ = bbc_samples(args.root, 128)
    model = load_sentence_encoder(Path(args.root) / MPNET)
    if args.diagnose:
        diagnose(model, arrays(evaluation[::5][:80]))
        return 0
    with tempfile.TemporaryDirectory(prefix="mpnet-dyn-") as tmp:
        side_by_side(model, arrays(evaluation[::4][:100]), arrays(train[:32]), args.rounds, Path(tmp))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
