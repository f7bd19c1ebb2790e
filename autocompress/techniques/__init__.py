"""Compression techniques: one module per family. They never import search or backends."""

from __future__ import annotations

from .distill import FeatureHints, kd_loss
from .fold import fold_batchnorm
from .lowrank import (
    RANK_MODES,
    factorize,
    factorize_conv,
    factorize_linear,
    factorize_spatial,
    factorize_tucker,
    factorized_macs,
    plan_factorization,
    rank_for,
    rank_for_energy,
)
from .prune import apply_masks, magnitude_mask, nm_mask, set_nm, set_sparsity, sparsity_of
from .quantize import (
    CALIBRATIONS,
    GRANULARITIES,
    QUANT_MODES,
    SCHEMES,
    FakeQuant,
    LSQFakeQuant,
    WeightQuant,
    add_fake_quant,
    fake_quant,
    int_range,
    qmax_for,
    quantize_weight,
    record_weight_quant,
    weight_qparams,
)
from .schedules import SCHEDULES, sparsity_at
from .structured import output_layers, prune_channels

__all__ = [
    "FeatureHints",
    "RANK_MODES",
    "factorize_spatial",
    "factorize_tucker",
    "plan_factorization",
    "rank_for_energy",
    "SCHEDULES",
    "nm_mask",
    "output_layers",
    "prune_channels",
    "set_nm",
    "FakeQuant",
    "LSQFakeQuant",
    "WeightQuant",
    "CALIBRATIONS",
    "GRANULARITIES",
    "QUANT_MODES",
    "SCHEMES",
    "int_range",
    "record_weight_quant",
    "weight_qparams",
    "add_fake_quant",
    "apply_masks",
    "factorize",
    "factorize_conv",
    "factorize_linear",
    "factorized_macs",
    "fake_quant",
    "fold_batchnorm",
    "kd_loss",
    "magnitude_mask",
    "qmax_for",
    "quantize_weight",
    "rank_for",
    "set_sparsity",
    "sparsity_at",
    "sparsity_of",
]
