"""Structured pruning of 50% of the channels of the ResNet-style reference model, lowered by the
onnxruntime backend: prints the measured latency and size ratios (pruned / unpruned), timed side by
side in one session. Exits 1 if the latency ratio is above 0.7.

    python benchmarks/structured_pruning.py [--width 32] [--ratio 0.5] [--round-to 8]
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import torch

from autocompress.backends import OnnxRuntimeBackend
from autocompress.inventory import compressible_layers
from autocompress.techniques import fold_batchnorm, prune_channels
from autocompress.testing import ResNetStyle


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--round-to", type=int, default=8)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = ResNetStyle(args.width).eval()
    x = ResNetStyle.example_inputs(1)
    pruned = copy.deepcopy(model)
    changes = prune_channels(
        pruned, x, {n: args.ratio for n, _ in compressible_layers(pruned)}, round_to=args.round_to
    )
    params = [sum(p.numel() for p in m.parameters()) for m in (model, pruned)]
    be = OnnxRuntimeBackend(batch_size=1, threads=1)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            full = be.lower(fold_batchnorm(model)[0], x, {}, Path(tmp) / "full")
            small = be.lower(fold_batchnorm(pruned)[0], x, {}, Path(tmp) / "pruned")
            lat_small, lat_full = be.measure_pair(small, full, x)
    finally:
        be.close()
    ratio = lat_small.median_ms / lat_full.median_ms
    print(
        f"ResNet-style width {args.width}, {len(changes)} layers narrowed, channels rounded to {args.round_to}"
    )
    print(f"params      {params[0]:>9,d} -> {params[1]:>9,d}  ({params[1] / params[0]:.3f}x)")
    print(
        f"size bytes  {full.size_bytes:>9,d} -> {small.size_bytes:>9,d}  ({small.size_bytes / full.size_bytes:.3f}x)"
    )
    print(
        f"latency ms  {lat_full.median_ms:>9.4f} -> {lat_small.median_ms:>9.4f}  ({ratio:.3f}x, "
        f"n={lat_small.n}/{lat_full.n}, onnxruntime cpu, batch 1, 1 thread, timed side by side)"
    )
    if ratio > 0.7:
        print(f"FAIL: latency ratio {ratio:.3f} > 0.7", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
