"""Sparse storage: the zeros of unstructured and 2:4 sparsity stored as such in the artifact.

A technique without per-layer fields: every layer whose plan prunes it unstructured (``sparsity > 0``)
or 2:4 is marked ``sparse`` in the lowering spec (:class:`~autocompress.lowering.LayerLowering`), after
fake quantization and weight sharing wrote theirs (pipeline order 46). The backend then stores the
layer's nonzero values (float32, or the codebook indices of a shared layer) and their positions (a
bitmask, or relative indices where those are smaller) whenever that is smaller than the dense weight,
and rebuilds the dense weight at load; the size objective is the artifact's bytes on disk. Layers
quantized to an integer grid (``bits`` 2 to 16) keep their dense quantized containers.
"""

from __future__ import annotations

from dataclasses import replace

from ..lowering import FLOAT_BITS, LayerLowering
from ..registry import TECHNIQUES, TechniqueSpec
from ._build import Build


def _sparse_planned(lp) -> bool:
    return (lp.sparsity_kind == "unstructured" and lp.sparsity > 0) or lp.sparsity_kind == "2:4"


def mark_sparse(build: Build) -> None:
    """Pipeline step (order 46): at the end, the pruned float layers are marked ``sparse``."""
    marked = [name for name, layer in build.layers().items() if _sparse_planned(build.plan.layer(layer))]
    if not marked:
        return

    def finish() -> None:
        for name in marked:
            lowering = build.lowering.get(name) or LayerLowering()
            if lowering.bits == FLOAT_BITS:
                build.lowering[name] = replace(lowering, sparse=True)

    build.finish.append(finish)


def size_floor(params: dict, info, floor: dict) -> None:
    """Stored sparse, a layer holds at least its nonzeros: at most the highest unstructured sparsity of
    the space (or half, 2:4) of its elements are not stored."""
    kinds = {str(k) for k in params["sparsity_kind"].values()}
    dropped = 0.0
    if "unstructured" in kinds:
        dropped = max(float(v) for v in params["sparsity"].values())
    if "2:4" in kinds:
        dropped = max(dropped, 0.5)
    floor["elements"] *= 1.0 - dropped


SPEC = TechniqueSpec("sparse_storage", steps=((46, mark_sparse),), size_floor=size_floor)
TECHNIQUES.add(SPEC.name, SPEC)
