"""Compression techniques: one module per family. They never import search or backends.

Importing this package registers the built-in families in :data:`autocompress.registry.TECHNIQUES`
(``fold``, ``layerdrop``, ``heads``, ``sparsity``, ``lowrank``, ``depthwise_separable``, ``quantize``,
``weight_sharing``, ``sparse_storage``, ``linear_attention``, ``distill``, ``encoder_kd``): each module owns
its per-layer fields (:class:`~autocompress.registry.Dim`), its pipeline steps and their order, its applicability probes.
"""

from __future__ import annotations

from . import (  # noqa: F401 - register families, HeadAttention's pruner
    attention_channels,
    depthwise_separable,
    layerdrop,
    linear_attention,
    reconstruct,
    sparse_storage,
    sparsity,
    weight_sharing,
)
from .distill import FeatureHints, distill_loss, kd_loss
from .encoder_kd import EncoderDistill, attention_kl, attention_log_probs, encoder_points, hidden_mse
from .fold import fold_batchnorm
from .heads import HeadAttention, attention_of, head_scores, heads_to_keep, prune_heads
from .layerdrop import KeptLayers, block_of, drop_blocks
from .lowrank import (
    RANK_MODES,
    cp_macs,
    factorize,
    factorize_conv,
    factorize_cp,
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
from .structured import (
    ChannelSchedule,
    bare_weights,
    output_layers,
    prune_channels,
    prune_to_widths,
    target_width,
)

__all__ = [
    "HeadAttention",
    "KeptLayers",
    "attention_of",
    "block_of",
    "drop_blocks",
    "head_scores",
    "heads_to_keep",
    "prune_heads",
    "FeatureHints",
    "EncoderDistill",
    "attention_kl",
    "attention_log_probs",
    "encoder_points",
    "hidden_mse",
    "RANK_MODES",
    "factorize_spatial",
    "factorize_tucker",
    "factorize_cp",
    "cp_macs",
    "plan_factorization",
    "rank_for_energy",
    "SCHEDULES",
    "nm_mask",
    "output_layers",
    "prune_channels",
    "prune_to_widths",
    "target_width",
    "bare_weights",
    "ChannelSchedule",
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
    "distill_loss",
    "kd_loss",
    "magnitude_mask",
    "qmax_for",
    "quantize_weight",
    "rank_for",
    "set_sparsity",
    "sparsity_at",
    "sparsity_of",
]
