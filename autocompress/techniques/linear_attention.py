"""Linear attention: softmax attention replaced, per attention block, by a kernelized linear one.

Katharopoulos, Vyas, Pappas & Fleuret, "Transformers are RNNs" (ICML 2020): with a positive feature map
``phi``, attention ``softmax(q k^T / sqrt(d)) v`` becomes, per head,

    out_i = phi(q_i) (sum_j phi(k_j)^T v_j) / (phi(q_i) . sum_j phi(k_j) + eps)

whose cost is linear in the sequence length (``n d^2`` instead of ``n^2 d``): the ``d x d`` sum
``phi(K)^T V`` is formed once and read by every query. The feature map is the paper's
``phi(x) = elu(x) + 1`` (positive, so the normalizer never vanishes), applied to the queries and keys as
the teacher's projections compute them (the ``1/sqrt(d)`` score scale has no place in it);
``eps`` = :data:`EPS`. A padding mask is honoured by zeroing ``phi(k_j)`` of the padded keys (they add
nothing to either sum), so the outputs at the real positions do not depend on the padding. Attention
dropout has no counterpart (the kernel forms no attention matrix). Masks that differ per query (causal,
an ``attn_mask``) cannot be expressed by key weights: they are refused.

The per-layer field ``attention`` (Optuna parameter ``attn.<layer>``, ``softmax`` or ``linear``) is read
on the output projection of an attention module, like ``heads_kept``: ``<attn>.out_proj`` of an
``nn.MultiheadAttention`` (also inside ``nn.TransformerEncoderLayer``) or of a
:class:`~autocompress.techniques.heads.HeadAttention`, ``<attention>.output.dense`` of a BERT-style
attention (transformers' ``BertAttention`` and its copies). On another layer it has no effect (noted;
the applicability check removes the choice there). MPNet's attention adds a relative position bias to
the scores, which a kernelized attention cannot carry: it is not an attention here.

What replaces the module: an ``nn.MultiheadAttention`` or ``HeadAttention`` becomes a
:class:`LinearHeadAttention` (a ``HeadAttention`` whose kernel is the linear one: same packed
``in_proj_weight``, same ``out_proj`` module, kept heads kept); a BERT-style ``attention.self`` becomes a
:class:`LinearSelfAttention` holding the same ``query``/``key``/``value`` Linear modules. The teacher's
weights are reused unchanged; the model is not the teacher's any more (the substitution is structural),
so the plan is fine-tuned where the study fine-tunes (:func:`autocompress.finetune_policy.recoverable`),
best with the encoder distillation of ``kd.features`` (``attention``: the KL between the teacher's softmax
attention and the student's normalized linear weights, :func:`linear_log_probs`; ``hidden``: block
outputs).

Pipeline step: order 12 (after layer dropping, head pruning and one-shot structured pruning, before the
least-squares refit, low rank and quantization).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, TechniqueError
from ..registry import TECHNIQUES, Dim, Probe, TechniqueSpec
from . import structured
from ._modules import set_module
from .attention_channels import head_attention_pruner
from .heads import HeadAttention, _check_mha, attention_of

ATTENTION_KINDS = ("softmax", "linear")
EPS = 1e-6  # added to the normalizer (it is positive: a row of masked keys only gives zeros)
FEATURE_MAP = "elu(x) + 1"
NOT_APPLIED = "attention kept softmax"


def feature_map(x: torch.Tensor) -> torch.Tensor:
    """``phi(x) = elu(x) + 1`` (positive everywhere; Katharopoulos et al. 2020)."""
    return F.elu(x) + 1.0


def linear_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None = None
) -> torch.Tensor:
    """Kernelized attention of ``q, k, v`` ``[batch, heads, tokens, head_dim]``.

    Args:
        keep: ``[batch, 1 or heads, keys]``: 1 for a key that is attended, 0 for a padded one (None: all).

    Returns:
        ``phi(q) (phi(k)^T v) / (phi(q) phi(k)^T 1 + eps)``, ``[batch, heads, queries, head_dim]``.
    """
    fq, fk = feature_map(q), feature_map(k)
    if keep is not None:
        fk = fk * keep.unsqueeze(-1).to(fk.dtype)
    kv = fk.transpose(-2, -1) @ v  # [b, h, d, d_v]: formed once, read by every query
    z = fk.sum(-2).unsqueeze(-1)  # [b, h, d, 1]
    return (fq @ kv) / (fq @ z + EPS)


def keys_kept(mask: torch.Tensor) -> torch.Tensor:
    """``[batch, 1 or heads, keys]`` weights (1 attended, 0 left out) of a key mask: an additive float mask
    (0 where attended, ``-inf`` or the dtype's lowest value where not) or a boolean one (True where
    attended, transformers' convention), ``[batch, keys]`` or ``[batch, 1 or heads, queries, keys]``
    (a key is kept when any query attends it: a padding mask leaves out the same keys for every query)."""
    kept = mask.float() if mask.dtype == torch.bool else (mask > torch.finfo(mask.dtype).min / 2).float()
    if kept.dim() == 4:
        return kept.amax(dim=-2)
    if kept.dim() == 2:
        return kept.unsqueeze(1)
    raise TechniqueError(f"linear attention: a key mask of shape {tuple(mask.shape)} is not supported")


def linear_log_probs(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The log of the linear attention's normalized weights ``phi(q_i) . phi(k_j) / sum_j (...)``,
    ``[batch, heads, queries, keys]`` (what attention distillation compares with the teacher's softmax);
    ``mask``: additive ``[batch or 1, heads or 1, queries, keys]``; a left-out key gets a tiny weight
    (a finite logarithm)."""
    a = feature_map(q).float() @ feature_map(k).float().transpose(-2, -1)
    if mask is not None:
        a = a * (mask > torch.finfo(mask.dtype).min / 2).float()
    p = a / (a.sum(-1, keepdim=True) + EPS)
    return p.clamp_min(1e-30).log()


# -- the modules ------------------------------------------------------------------------------------
class LinearHeadAttention(HeadAttention):
    """A :class:`HeadAttention` whose kernel is :func:`linear_attention` (``attention_kind`` "linear").

    ``key_padding_mask`` is honoured (``nn.MultiheadAttention``'s convention: True or ``-inf`` = left out);
    an ``attn_mask`` or ``is_causal`` raises :class:`TechniqueError` (a per-query mask has no linear form).
    """

    attention_kind = "linear"

    def _attend(self, q, k, v, attn_mask, key_padding_mask, is_causal: bool) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise TechniqueError(
                "linear attention honours key padding masks only: an attn_mask or is_causal differs per query"
            )
        keep = None
        if key_padding_mask is not None:
            pad = key_padding_mask
            keep = (~pad).float() if pad.dtype == torch.bool else keys_kept(pad.to(q.dtype))
            keep = keep.reshape(q.shape[0], 1, k.shape[2])
        return linear_attention(q, k, v, keep)


class LinearSelfAttention(nn.Module):
    """What a BERT-style ``attention.self`` becomes: the same ``query``/``key``/``value`` Linear modules,
    :func:`linear_attention` in place of softmax; called like transformers' self-attention
    (``hidden_states, attention_mask, ...``), it returns ``(context, None)``."""

    attention_kind = "linear"

    def __init__(self, source: nn.Module):
        super().__init__()
        self.query, self.key, self.value = source.query, source.key, source.value
        d = int(source.attention_head_size)
        self.attention_head_size = d
        self.num_attention_heads = self.query.out_features // d
        self.all_head_size = self.query.out_features
        self.scaling = float(getattr(source, "scaling", d**-0.5))  # read by encoder KD's softmax twin
        kept = getattr(source, "kept_heads", None)
        if kept:
            self.kept_heads = tuple(kept)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, *args, **kwargs
    ):
        shape = (*hidden_states.shape[:-1], -1, self.attention_head_size)
        q, k, v = (p(hidden_states).view(shape).transpose(1, 2) for p in (self.query, self.key, self.value))
        keep = keys_kept(attention_mask) if attention_mask is not None else None
        out = linear_attention(q, k, v, keep)
        return out.transpose(1, 2).reshape(*hidden_states.shape[:-1], -1), None


structured.CUSTOM_PRUNERS[LinearHeadAttention] = head_attention_pruner  # channels go as a HeadAttention's


def is_linear(module: nn.Module) -> bool:
    """Whether ``module`` (an attention module) computes linear attention."""
    return getattr(module, "attention_kind", "softmax") == "linear"


def _to_linear_mha(name: str, m: nn.MultiheadAttention | HeadAttention) -> LinearHeadAttention:
    if isinstance(m, nn.MultiheadAttention):
        _check_mha(name, m)
    new = LinearHeadAttention(
        m.embed_dim,
        m.num_heads,
        m.head_dim,
        batch_first=m.batch_first,
        dropout=float(m.dropout),
        bias=m.in_proj_bias is not None,
        kept_heads=getattr(m, "kept_heads", ()),
        source_heads=getattr(m, "source_heads", 0),
    ).to(device=m.in_proj_weight.device, dtype=m.in_proj_weight.dtype)
    with torch.no_grad():
        new.in_proj_weight.copy_(m.in_proj_weight.detach())
        if m.in_proj_bias is not None:
            new.in_proj_bias.copy_(m.in_proj_bias.detach())
    new.out_proj = m.out_proj  # the same module: its name, and what later steps put on it, stay
    new.train(m.training)
    return new


def linearize(model: nn.Module, layer: str) -> str:
    """Replace the attention whose output projection is ``layer`` by its linear twin (in place); returns
    the replaced module's name.

    Raises:
        TechniqueError: ``layer`` is no attention output projection, the attention is causal (a decoder),
            or an ``nn.MultiheadAttention`` has kdim/vdim, add_bias_kv or add_zero_attn.
    """
    found = attention_of(model, layer)
    if found is None:
        raise TechniqueError(f"{layer!r} is not the output projection of an attention module")
    name, m = found
    if isinstance(m, nn.MultiheadAttention | HeadAttention):
        if not is_linear(m):
            set_module(model, name, _to_linear_mha(name, m))
        for enc in model.modules():  # its nested-tensor fast path assumes nn.MultiheadAttention
            if isinstance(enc, nn.TransformerEncoder):
                enc.use_nested_tensor = False
        return name
    sa = m.self
    if getattr(sa, "is_decoder", False) or getattr(sa, "is_causal", False):
        raise TechniqueError(f"linear attention of {name!r}: a causal (decoder) attention is not supported")
    if not is_linear(sa):
        m.self = LinearSelfAttention(sa)
    return f"{name}.self"


# -- the technique ---------------------------------------------------------------------------------
def linear_step(build) -> None:
    """Pipeline order 12: each layer planned ``attention: linear`` linearizes its attention (or is noted)."""
    for name, layer in build.layers().items():
        if build.plan.layer(layer).attention != "linear":
            continue
        if attention_of(build.student, name) is None:
            build.note(
                layer,
                f"{NOT_APPLIED}: {name} is not the output projection of an attention module "
                "(nn.MultiheadAttention's out_proj, a BERT-style attention's output.dense)",
            )
            continue
        module = linearize(build.student, name)
        build.note(layer, f"linear attention: {module} (phi(x) = {FEATURE_MAP})")


def probes(params: dict, info, allowed: dict) -> list[Probe]:
    """Applicability: ``linear`` where the layer's domain offers it (skipped off attention outputs)."""
    if "linear" not in [str(v) for v in params["attention"].values()]:
        return []
    return [
        Probe(
            ("attention", "linear"),
            "linear attention",
            "attention",
            "linear",
            "attention linear",
            {"attention": "linear"},
            skipped=(NOT_APPLIED,),
        )
    ]


def check_model(space, model, source) -> None:
    """Refuse a space that offers ``attention: linear`` for a model without an attention module it can
    apply to (ConfigError, one line); ``model()`` builds the model (only when the space offers it)."""
    domains = [space.model.attention, *(ls.attention for ls in space.model.layers.values())]
    if not any(p is not None and "linear" in [str(v) for v in p.values()] for p in domains):
        return
    net = model()
    if any(attention_of(net, n) is not None for n, m in net.named_modules() if isinstance(m, nn.Linear)):
        return
    raise ConfigError(
        "linear is not allowed: the model has no attention module (nn.MultiheadAttention, HeadAttention, "
        "BERT-style self-attention) whose output projection is a compressible layer",
        source=source,
        field="attention",
    )


SPEC = TechniqueSpec(
    "linear_attention",
    dims=(
        Dim(
            "attention",
            "softmax",
            short="attn",
            choices=ATTENTION_KINDS,
            order=96,
            asked=lambda values: bool(values.get("keep_layer", True)),  # a dropped layer has no attention
        ),
    ),
    steps=((12, linear_step),),
    probes=probes,
    collapse={"attention": ("attention", "softmax")},
    check_model=check_model,
)
TECHNIQUES.add(SPEC.name, SPEC)
