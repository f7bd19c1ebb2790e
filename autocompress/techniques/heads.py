"""Attention head pruning: the technique family of ``heads_kept``.

A layer's ``heads_kept`` is read on the output projection of an attention module, the one inventory
layer every attention has: ``<attn>.out_proj`` of an ``nn.MultiheadAttention`` (also inside
``nn.TransformerEncoderLayer``), ``<attention>.output.dense`` of a BERT-style attention (transformers'
``BertAttention`` and its copies: ``self.query/key/value`` plus ``output.dense``). It is the fraction of
the module's heads kept, ``ceil(heads_kept * heads)`` and at least one; on any other layer it has no
effect (noted).

Which heads go: those whose columns of the output projection have the smallest L2 norm (each head's
``head_dim`` input columns; data-free, so a plan always gives the same model). Pruning removes the
head's query, key and value rows and its output-projection columns; ``head_dim`` and the model width
stay, so the model's output keeps its shape, and the result equals the unpruned model with those heads'
contributions zeroed. An ``nn.MultiheadAttention`` is replaced by a :class:`HeadAttention` (its forward
signature, ``F.scaled_dot_product_attention`` inside, exports to ONNX); a BERT-style attention keeps its
classes, its ``query``/``key``/``value``/``output.dense`` become narrower ``nn.Linear`` layers.

Pipeline step: order 5 (after folding, before structured pruning, low rank and quantization, which
then see the narrower layers under their teacher names).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import TechniqueError
from ..registry import TECHNIQUES, Dim, Probe, TechniqueSpec
from ._modules import get_module, set_module


class HeadAttention(nn.Module):
    """Multi-head attention with ``num_heads`` heads of ``head_dim`` on a model of width ``embed_dim``
    (``num_heads * head_dim`` may be less): what an ``nn.MultiheadAttention`` becomes when heads go.

    Same call as ``nn.MultiheadAttention`` (``query, key, value, key_padding_mask, need_weights,
    attn_mask, average_attn_weights, is_causal``), same packed ``in_proj_weight`` / ``in_proj_bias``
    (query, key, value rows of the kept heads) and ``out_proj``; it returns ``(output, None)``: no
    attention weights. ``kept_heads`` are the original indices of its heads, ``source_heads`` their
    original count (a 3-D ``attn_mask`` is given per original head). ``_qkv_same_embed_dim`` is False so
    that ``nn.TransformerEncoderLayer`` never takes its fused fast path (it assumes the full width).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        head_dim: int,
        *,
        batch_first: bool = False,
        dropout: float = 0.0,
        bias: bool = True,
        kept_heads: tuple[int, ...] = (),
        source_heads: int = 0,
    ):
        super().__init__()
        inner = num_heads * head_dim
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.batch_first, self.dropout = batch_first, dropout
        self.kept_heads = tuple(kept_heads) or tuple(range(num_heads))
        self.source_heads = source_heads or num_heads
        self._qkv_same_embed_dim = False
        self.in_proj_weight = nn.Parameter(torch.empty(3 * inner, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * inner)) if bias else None
        self.out_proj = nn.Linear(inner, embed_dim, bias=bias)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, None]:
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        if not self.batch_first or unbatched:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        b, n_q, h, d = query.shape[0], query.shape[1], self.num_heads, self.head_dim
        w = self.in_proj_weight.chunk(3)
        bias = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        q, k, v = (
            F.linear(x, wi, bi).reshape(b, x.shape[1], h, d).transpose(1, 2)
            for x, wi, bi in zip((query, key, value), w, bias, strict=True)
        )
        out = self._attend(q, k, v, attn_mask, key_padding_mask, is_causal)
        out = self.out_proj(out.transpose(1, 2).reshape(b, n_q, h * d))
        if not self.batch_first or unbatched:
            out = out.transpose(0, 1)
        return (out.squeeze(1) if unbatched else out), None

    def _attend(self, q, k, v, attn_mask, key_padding_mask, is_causal: bool) -> torch.Tensor:
        """Softmax attention of ``q, k, v`` ``[batch, heads, tokens, head_dim]`` (a subclass may swap the
        kernel: :class:`~autocompress.techniques.linear_attention.LinearHeadAttention`)."""
        b, n_q, n_k = q.shape[0], q.shape[2], k.shape[2]
        mask = self._mask(attn_mask, key_padding_mask, b, n_q, n_k, q.dtype)
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=bool(is_causal and mask is None),
        )

    def _mask(self, attn_mask, key_padding_mask, b: int, n_q: int, n_k: int, dtype) -> torch.Tensor | None:
        """One additive float mask ``[b or 1, heads or 1, n_q, n_k]`` (``nn.MultiheadAttention``'s
        conventions: a True entry of a boolean mask is left out, a float mask is added)."""

        def additive(m: torch.Tensor) -> torch.Tensor:
            if m.dtype == torch.bool:
                return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, float("-inf"))
            return m.to(dtype)

        mask = None
        if attn_mask is not None:
            mask = additive(attn_mask)
            if mask.dim() == 3:  # [batch * original heads, n_q, n_k]: the kept heads' rows
                mask = mask.reshape(b, self.source_heads, n_q, n_k)[:, list(self.kept_heads)]
        if key_padding_mask is not None:
            pad = additive(key_padding_mask).reshape(b, 1, 1, n_k)
            mask = pad if mask is None else mask + pad
        return mask


# -- finding attention modules ----------------------------------------------------------------------


def _is_bert_attention(module: nn.Module) -> bool:
    sa, out = getattr(module, "self", None), getattr(module, "output", None)
    return (
        sa is not None
        and all(isinstance(getattr(sa, p, None), nn.Linear) for p in ("query", "key", "value"))
        and isinstance(getattr(sa, "attention_head_size", None), int)
        and isinstance(getattr(out, "dense", None), nn.Linear)
    )


def attention_of(model: nn.Module, layer: str) -> tuple[str, nn.Module] | None:
    """``(attention module name, module)`` when ``layer`` is the output projection of an attention
    (``nn.MultiheadAttention`` / :class:`HeadAttention` ``out_proj``, a BERT-style ``output.dense``)."""
    parts = layer.split(".")
    if len(parts) >= 2 and parts[-1] == "out_proj":
        name = ".".join(parts[:-1])
        m = get_module(model, name)
        if isinstance(m, nn.MultiheadAttention | HeadAttention):
            return name, m
    if len(parts) >= 3 and parts[-2:] == ["output", "dense"]:
        name = ".".join(parts[:-2])
        m = get_module(model, name)
        if _is_bert_attention(m):
            return name, m
    return None


def head_count(module: nn.Module) -> tuple[int, int]:
    """(heads, head_dim) of an attention module :func:`attention_of` finds."""
    if isinstance(module, nn.MultiheadAttention | HeadAttention):
        return module.num_heads, module.head_dim
    d = module.self.attention_head_size
    return module.self.query.out_features // d, d


def heads_to_keep(fraction: float, heads: int) -> int:
    """``ceil(fraction * heads)``, at least 1 (a fraction in (0, 1])."""
    if not (0.0 < fraction <= 1.0):
        raise TechniqueError(f"heads_kept {fraction} is outside (0, 1]")
    return max(1, math.ceil(fraction * heads - 1e-9))


def head_scores(out_weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The L2 norm of each head's ``head_dim`` input columns of the output projection's weight."""
    w = out_weight.detach()
    return w.reshape(w.shape[0], -1, head_dim).pow(2).sum((0, 2)).sqrt()


def _rows(idx: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (idx[:, None] * head_dim + torch.arange(head_dim)).flatten()


def _narrow(
    layer: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None
) -> nn.Linear:
    w = layer.weight.detach()
    w = w[rows] if rows is not None else w
    w = w[:, cols] if cols is not None else w
    new = nn.Linear(w.shape[1], w.shape[0], bias=layer.bias is not None)
    new = new.to(device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if layer.bias is not None:
            new.bias.copy_(layer.bias.detach()[rows] if rows is not None else layer.bias.detach())
    return new


def _check_mha(name: str, m: nn.MultiheadAttention) -> None:
    if not m._qkv_same_embed_dim:
        raise TechniqueError(
            f"head pruning of {name!r}: key/value widths differ from the query's (kdim/vdim)"
        )
    if m.bias_k is not None or m.add_zero_attn:
        raise TechniqueError(f"head pruning of {name!r}: add_bias_kv / add_zero_attn are not supported")


def _prune_mha(m: nn.MultiheadAttention | HeadAttention, keep: torch.Tensor) -> HeadAttention:
    h, d = head_count(m)
    rows = _rows(keep, d)
    qkv = torch.cat([rows + i * h * d for i in range(3)])
    kept = (
        tuple(m.kept_heads[i] for i in keep.tolist())
        if isinstance(m, HeadAttention)
        else tuple(keep.tolist())
    )
    source = m.source_heads if isinstance(m, HeadAttention) else h
    new = HeadAttention(
        m.embed_dim,
        len(keep),
        d,
        batch_first=m.batch_first,
        dropout=float(m.dropout),
        bias=m.in_proj_bias is not None,
        kept_heads=kept,
        source_heads=source,
    ).to(device=m.in_proj_weight.device, dtype=m.in_proj_weight.dtype)
    with torch.no_grad():
        new.in_proj_weight.copy_(m.in_proj_weight.detach()[qkv])
        if m.in_proj_bias is not None:
            new.in_proj_bias.copy_(m.in_proj_bias.detach()[qkv])
    new.out_proj = _narrow(m.out_proj, cols=rows)
    new.train(m.training)
    return new


def _prune_bert(m: nn.Module, keep: torch.Tensor) -> None:
    sa = m.self
    rows = _rows(keep, sa.attention_head_size)
    for p in ("query", "key", "value"):
        setattr(sa, p, _narrow(getattr(sa, p), rows=rows))
    m.output.dense = _narrow(m.output.dense, cols=rows)
    for attr, value in (("num_attention_heads", len(keep)), ("all_head_size", len(rows))):
        if hasattr(sa, attr):
            setattr(sa, attr, value)
    before = getattr(sa, "kept_heads", None)  # the original indices of the kept heads (encoder KD reads them)
    sa.kept_heads = tuple(before[i] for i in keep.tolist()) if before else tuple(keep.tolist())


def prune_heads(model: nn.Module, layer: str, keep_count: int) -> tuple[int, list[int]]:
    """Keep the ``keep_count`` heads of the attention whose output projection is ``layer`` with the
    largest :func:`head_scores` (in place). Returns (heads before, kept heads' indices among them).

    Raises:
        TechniqueError: ``layer`` is not an attention's output projection, the count is out of range,
            or the ``nn.MultiheadAttention`` has kdim/vdim, add_bias_kv or add_zero_attn.
    """
    found = attention_of(model, layer)
    if found is None:
        raise TechniqueError(f"{layer!r} is not the output projection of an attention module")
    name, m = found
    heads, d = head_count(m)
    if not (1 <= keep_count <= heads):
        raise TechniqueError(f"cannot keep {keep_count} of the {heads} heads of {name!r}")
    out = m.out_proj if hasattr(m, "out_proj") else m.output.dense
    order = torch.argsort(head_scores(out.weight, d), descending=True, stable=True)
    keep = order[:keep_count].sort().values
    if isinstance(m, nn.MultiheadAttention):
        _check_mha(name, m)
    if isinstance(m, nn.MultiheadAttention | HeadAttention):
        set_module(model, name, _prune_mha(m, keep))
        for enc in model.modules():  # its nested-tensor fast path assumes full-width attention
            if isinstance(enc, nn.TransformerEncoder):
                enc.use_nested_tensor = False
    else:
        _prune_bert(m, keep)
    return heads, keep.tolist()


# -- the technique ---------------------------------------------------------------------------------

NOT_ATTENTION = "heads not pruned"


def heads_step(build) -> None:
    """Pipeline order 5: each layer planned ``heads_kept < 1`` loses heads (or gets a note why not)."""
    for name, layer in build.layers().items():
        fraction = build.plan.layer(layer).heads_kept
        if fraction >= 1.0:
            continue
        found = attention_of(build.student, name)
        if found is None:
            build.note(
                layer,
                f"{NOT_ATTENTION}: {name} is not the output projection of an attention module "
                "(nn.MultiheadAttention's out_proj, a BERT-style attention's output.dense)",
            )
            continue
        heads, _ = head_count(found[1])
        keep = heads_to_keep(fraction, heads)
        if keep == heads:
            build.note(layer, f"{NOT_ATTENTION}: heads_kept {fraction:g} of {heads} heads keeps all")
            continue
        _, kept = prune_heads(build.student, name, keep)
        build.note(
            layer,
            f"heads: {heads} -> {keep} (kept {', '.join(map(str, kept))}: largest L2 norm of their "
            "output-projection columns)",
        )


def _fraction_rule(v) -> str | None:
    ok = isinstance(v, int | float) and not isinstance(v, bool) and 0 < v <= 1
    return None if ok else "is outside (0, 1]"


def probes(params: dict, info, allowed: dict) -> list[Probe]:
    """Applicability: each fraction below 1 the layer's domain allows (a range: its lower end)."""
    values = sorted({float(v) for v in params["heads_kept"].values() if float(v) < 1.0})
    return [
        Probe(
            ("heads", v),
            "head pruning",
            "heads_kept",
            v,
            f"heads_kept {v:g}",
            {"heads_kept": v},
            skipped=(NOT_ATTENTION,),
        )
        for v in values
    ]


def size_floor(params: dict, info, floor: dict) -> None:
    """The output projection keeps at least the lowest fraction of its input columns."""
    low = min(float(v) for v in params["heads_kept"].values())
    if low < 1.0:
        floor["elements"] *= low


SPEC = TechniqueSpec(
    "heads",
    dims=(
        Dim(
            "heads_kept",
            1.0,
            short="heads",
            cast=float,
            check=_fraction_rule,
            order=95,
            asked=lambda values: bool(values.get("keep_layer", True)),  # a dropped layer has no heads
        ),
    ),
    steps=((5, heads_step),),
    probes=probes,
    collapse={"heads_kept": ("heads_kept", 1.0)},  # no fraction below 1 left: all heads kept
    size_floor=size_floor,
)
TECHNIQUES.add(SPEC.name, SPEC)
