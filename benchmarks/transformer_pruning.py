"""Head pruning and layer dropping on an ``nn.TransformerEncoder`` (d_model 256, 8 heads, FFN 1024,
4 layers, sequence 64, batch 1), lowered by the onnxruntime backend in float: prints the measured
latency and size ratios against the unpruned artifact, each pair timed side by side in one session.
Exits 1 if half the heads do not make the artifact faster (ratio >= 1).

    python benchmarks/transformer_pruning.py [--heads-kept 0.5] [--layers 4] [--seq 64]
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

from autocompress.backends import OnnxRuntimeBackend
from autocompress.techniques import drop_blocks, heads_to_keep, prune_heads
from autocompress.testing.models import torch_encoder


class Encoder(nn.Module):
    def __init__(self, d_model: int, heads: int, layers: int):
        super().__init__()
        self.encoder = torch_encoder(d_model, heads, 4 * d_model, layers)

    def forward(self, x):
        return self.encoder(x)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--heads-kept", type=float, default=0.5)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = Encoder(args.d_model, args.heads, args.layers).eval()
    x = (torch.randn(1, args.seq, args.d_model),)
    keep = heads_to_keep(args.heads_kept, args.heads)
    pruned = copy.deepcopy(model)
    for i in range(args.layers):
        prune_heads(pruned, f"encoder.layers.{i}.self_attn.out_proj", keep)
    dropped = copy.deepcopy(model)
    drop_blocks(dropped, {"encoder.layers": {str(i) for i in range(1, args.layers, 2)}})  # every other
    with torch.no_grad():
        print(f"torch outputs: {tuple(pruned(*x).shape)} (pruned), {tuple(dropped(*x).shape)} (dropped)")
    be = OnnxRuntimeBackend(batch_size=1, threads=1)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            full = be.lower(model, x, {}, Path(tmp) / "full")
            rows = []
            for name, m in (
                (f"heads {args.heads} -> {keep}", pruned),
                (f"layers {args.layers} -> {len(dropped.encoder.layers)}", dropped),
            ):
                art = be.lower(m, x, {}, Path(tmp) / name.split()[0])
                small, ref = be.measure_pair(art, full, x)
                rows.append((name, art, small, ref))
    finally:
        be.close()
    print(
        f"nn.TransformerEncoder d_model {args.d_model}, {args.heads} heads, {args.layers} layers, sequence "
        f"{args.seq}, onnxruntime cpu, batch 1, 1 thread, float, each pair timed side by side"
    )
    ratios = []
    for name, art, small, ref in rows:
        ratio = small.median_ms / ref.median_ms
        ratios.append(ratio)
        print(
            f"{name:<16} latency ms {ref.median_ms:8.3f} -> {small.median_ms:8.3f} ({ratio:.3f}x, "
            f"n={small.n}/{ref.n}); size {full.size_bytes:,d} -> {art.size_bytes:,d} bytes "
            f"({art.size_bytes / full.size_bytes:.3f}x)"
        )
    if ratios[0] >= 1.0:
        print(f"FAIL: head pruning latency ratio {ratios[0]:.3f} >= 1", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
