"""Weight sharing (Han, Mao & Dally, "Deep Compression", ICLR 2016, section 3): a layer's weights are
clustered to ``2 ** share_bits`` shared values (a codebook); each weight is stored as the index of its
cluster, and the codebook is trained during fine-tuning with the gradients of its members summed.

Per-layer fields (Optuna parameters ``share.<layer>`` and ``share_init.<layer>``):

- ``share_bits``: 0 (off) or 2 to 8: the codebook holds ``2 ** share_bits`` values and each weight
  costs ``share_bits`` bits in the artifact (plus the codebook, float32);
- ``share_init``: how the centroids start before Lloyd's k-means refines them on the layer's weights,
  the three initialisations the paper compares: ``linear`` (evenly spaced over ``[min, max]``, the
  paper's best), ``density`` (at equal quantiles of the weights' distribution) and ``forgy`` (randomly
  chosen weights, seeded).

Pruned weights (zeros of an unstructured or 2:4 mask) are not clustered: they stay exact zeros, as in the
paper (prune, retrain, then share the survivors). The clusters are formed during fine-tuning once the
masks are final: half-way between the end of the pruning schedule and the end of fine-tuning when any
layer is pruned, at the first step otherwise (at the end without fine-tuning). From then on the layer's
weight is ``codebook[index] * keep``: the gradient of ``codebook[index]`` sums the gradients of each
cluster's members into its centroid (the paper's update rule), and the indices stay fixed.

``bits`` and weight sharing on one layer: a shared layer's weight is the float32 codebook's values, so
``share_bits`` is asked only where ``bits`` is 32 (float); a plan that sets both is refused with one line.

The lowering spec carries the codebook, the indices and the kept positions
(:class:`~autocompress.lowering.SharedWeight`): the backend stores packed indices plus the codebook and
rebuilds the weight at load (ONNX Runtime: ops it folds at session load, so inference runs dense kernels).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import ConfigError, TechniqueError
from ..lowering import FLOAT_BITS, LayerLowering, SharedWeight
from ..registry import TECHNIQUES, Dim, Probe, TechniqueSpec
from ._build import Build

SHARE_BITS = (0, 2, 3, 4, 5, 6, 7, 8)  # 0: not shared
SHARE_INITS = ("linear", "density", "forgy")
KMEANS_ITERS = 30


def _init_centroids(values: torch.Tensor, k: int, init: str, seed: int = 0) -> torch.Tensor:
    lo, hi = values.min(), values.max()
    if init == "linear":
        return torch.linspace(float(lo), float(hi), k, dtype=values.dtype)
    if init == "density":
        q = (torch.arange(k, dtype=torch.float64) + 0.5) / k
        return torch.quantile(values.double(), q).to(values.dtype)
    if init == "forgy":
        gen = torch.Generator().manual_seed(seed)
        pick = torch.randperm(len(values), generator=gen)[:k]
        return values[pick].sort().values
    raise TechniqueError(f"unknown weight-sharing initialisation {init!r}; known: {', '.join(SHARE_INITS)}")


def _assign(values: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid of each value (1-D: the midpoints between sorted centroids)."""
    order = torch.argsort(centroids)
    c = centroids[order]
    mid = (c[1:] + c[:-1]) / 2
    return order[torch.searchsorted(mid, values.contiguous())]


def kmeans_1d(
    values: torch.Tensor, k: int, init: str = "linear", iters: int = KMEANS_ITERS, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means of 1-D ``values`` into ``k`` clusters: ``(centroids [k], index [len(values)])``.

    A cluster left empty keeps its centroid (it costs a code, never a wrong value). Deterministic.
    """
    values = values.detach().flatten().float()
    if len(values) == 0:
        return torch.zeros(k), torch.zeros(0, dtype=torch.long)
    centroids = _init_centroids(values, min(k, len(values)) if init == "forgy" else k, init, seed)
    if len(centroids) < k:  # fewer values than codes (forgy): pad with copies of the last
        centroids = torch.cat([centroids, centroids[-1:].expand(k - len(centroids))])
    index = _assign(values, centroids)
    for _ in range(iters):
        sums = torch.zeros(k).index_add_(0, index, values)
        counts = torch.zeros(k).index_add_(0, index, torch.ones_like(values))
        new = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
        new_index = _assign(values, new)
        done = torch.equal(new_index, index)
        centroids, index = new, new_index
        if done:
            break
    return centroids, index


class SharedParam(nn.Module):
    """Parametrization ``weight -> codebook[index] * keep`` (after any mask): the trained codebook."""

    def __init__(self, weight: torch.Tensor, bits: int, init: str, seed: int = 0):
        super().__init__()
        w = weight.detach()
        keep = w != 0
        centroids, idx = kmeans_1d(w[keep], 2**bits, init, seed=seed)
        index = torch.zeros(w.shape, dtype=torch.long)
        index[keep] = idx
        self.bits = bits
        self.codebook = nn.Parameter(centroids.to(w.dtype))
        self.register_buffer("index", index)
        self.register_buffer("keep", keep.to(w.dtype))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self.codebook[self.index] * self.keep

    def record(self) -> SharedWeight:
        keep = self.keep.bool()
        return SharedWeight(
            self.bits,
            self.codebook.detach().float().numpy().copy(),
            self.index.numpy().copy(),
            None if bool(keep.all()) else keep.numpy().copy(),
        )


def _shared_of(module: nn.Module) -> SharedParam | None:
    if not parametrize.is_parametrized(module, "weight"):
        return None
    return next((p for p in module.parametrizations.weight if isinstance(p, SharedParam)), None)


def share_weight(module: nn.Module, bits: int, init: str = "linear", seed: int = 0) -> SharedParam:
    """Cluster ``module.weight`` (as its parametrizations make it) to ``2 ** bits`` shared values."""
    if not 2 <= bits <= 8:
        raise TechniqueError(f"weight sharing needs 2 to 8 index bits, got {bits}")
    with torch.no_grad():
        w = module.weight.detach().clone()
    shared = SharedParam(w, bits, init, seed)
    parametrize.register_parametrization(module, "weight", shared)
    return shared


def cluster_point(plan, total: int) -> float:
    """Fine-tuning progress at which the clusters are formed (see the module docstring)."""
    if total == 0:
        return 1.0
    s = plan.schedule
    pruned = any(lp.sparsity > 0 or lp.sparsity_kind == "2:4" for lp in plan.layers.values())
    if not pruned:
        return 0.0
    settled = s.start if s.kind == "one_shot" else s.end
    return settled + (1.0 - settled) / 2


def share_step(build: Build) -> None:
    """Pipeline step (order 45, after the masks and fake quantization): cluster at :func:`cluster_point`; record at the end."""
    planned = {
        name: build.plan.layer(layer)
        for name, layer in build.layers().items()
        if build.plan.layer(layer).share_bits > 0
    }
    if not planned:
        return
    at = cluster_point(build.plan, build.total)
    done: dict[str, SharedParam] = {}

    def cluster(progress: float) -> bool:
        if done or progress < at:
            return False
        for name, lp in planned.items():
            done[name] = share_weight(build.modules[name], lp.share_bits, lp.share_init, build.plan.seed)
            build.note(build.layers()[name], f"shared: {2**lp.share_bits} values ({lp.share_init} init)")
        return True  # new trainable codebooks: the optimizer starts afresh over them

    def finish() -> None:
        for name, shared in done.items():
            build.lowering[name] = _with_shared(build.lowering.get(name), shared.record())

    build.progress.append(cluster)
    build.finish.append(finish)


def _with_shared(lowering: LayerLowering | None, shared: SharedWeight) -> LayerLowering:
    return LayerLowering(shared=shared) if lowering is None else replace(lowering, shared=shared)


def check_layer(lp, where: str) -> None:
    if lp.share_bits > 0 and lp.bits != FLOAT_BITS:
        raise ConfigError(
            f"share_bits {lp.share_bits} needs bits {FLOAT_BITS} (a shared layer's weights are its float "
            f"codebook's values), got bits {lp.bits}",
            field=f"{where}.share_bits",
        )


def _float(values: dict) -> bool:
    return int(values["bits"]) == FLOAT_BITS


def probes(params: dict, info, allowed: dict) -> list[Probe]:
    """Applicability: the fewest shared values the space allows (lowered: the backend must rebuild it)."""
    bits = [int(b) for b in params["share_bits"].values() if int(b) > 0]
    if not bits:
        return []
    b = min(bits)
    init = str(params["share_init"].values()[0])
    layer = {"share_bits": b, "share_init": init}
    return [Probe(("share", b, init), "weight sharing", "share_bits", b, f"share_bits {b}", layer)]


def size_floor(params: dict, info, floor: dict) -> None:
    """A shared layer stores ``share_bits`` bits per weight (the codebook only adds bytes): the floor's
    bits are the fewest of the bit widths and the shared index widths the space allows."""
    shared = [int(b) for b in params["share_bits"].values() if int(b) > 0]
    if shared:
        floor["bits"] = min(floor["bits"], min(shared))


SPEC = TechniqueSpec(
    "weight_sharing",
    dims=(
        Dim("share_bits", 0, short="share", cast=int, choices=SHARE_BITS, order=90, asked=_float),
        Dim(
            "share_init",
            "linear",
            choices=SHARE_INITS,
            order=91,
            asked=lambda values: int(values.get("share_bits", 0)) > 0,
            report=False,
        ),
    ),
    steps=((45, share_step),),
    check_layer=check_layer,
    probes=probes,
    collapse={"share_bits": ("share_bits", 0)},
    size_floor=size_floor,
)
TECHNIQUES.add(SPEC.name, SPEC)
