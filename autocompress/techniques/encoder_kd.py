"""Encoder distillation (TinyBERT / MiniLM): per-layer hidden states and attention distributions.

Besides the task's logit loss, the fine-tune of a transformer encoder can match, layer by layer, what the
teacher computes inside: ``kd_features``

* ``hidden``: the MSE between the student's and the teacher's output of each encoder block (TinyBERT's
  hidden-state loss, Jiao et al. 2020);
* ``attention``: the KL divergence ``KL(teacher || student)`` between the attention distributions of
  each attention module, per query, averaged (MiniLM's attention transfer, Wang et al. 2020);
* ``hidden+attention``: both (``none``: neither, the default), each term weighed by ``kd_feature_weight``.

Which modules: attention modules are ``nn.MultiheadAttention`` (also inside ``nn.TransformerEncoderLayer``),
the project's :class:`~autocompress.techniques.heads.HeadAttention` (what head pruning leaves) and
BERT-style self-attention (transformers' ``BertSelfAttention`` and its copies: ``query``/``key``/``value``
Linears and ``attention_head_size``); an encoder block is the item of a layer list (``nn.ModuleList`` /
``nn.Sequential``: ``nn.TransformerEncoder.layers``, BERT's ``encoder.layer``) that holds an attention,
or any module with Linear query / key / value projections (MPNet's self-attention, whose relative
position bias is not recomputed here: such a model offers ``hidden`` but not ``attention``). A model
with neither offers no choice but ``none`` (the applicability check removes the others before the
search).

Student and teacher points are paired by name: head pruning, layer dropping (kept blocks keep their teacher
names) and structured pruning keep the names, so a student block distils from the teacher block it came
from. Features are collected by forward hooks on both models (nothing of the models is edited; the hooks
are removed when the fine-tune ends or fails). Attention distributions are recomputed in the hook from the
module's inputs and its query/key projections (``softmax(q k^T / sqrt(d) + mask)``: the modules' fused
kernels return none; a linear attention's normalized kernel weights, see :mod:`.linear_attention`); while features are distilled, torch's fused inference path of
``nn.TransformerEncoderLayer`` is switched off (``torch.backends.mha.set_fastpath_enabled``), so that the
teacher's attention modules run and their hooks fire. When the student kept fewer heads, each kept head
is matched with the teacher head it came from (:class:`HeadAttention` and pruned BERT attention record
which); otherwise, when the counts differ, the distributions averaged over heads are compared. Where
structured pruning narrowed the model width, a trainable Linear maps the student's hidden states to the
teacher's width (built before the optimizer, rebuilt when layers shrink).

Pipeline step: order 55 (after every structural change; loss terms of the fine-tune).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import TechniqueError
from ..registry import TECHNIQUES, Dim, TechniqueSpec
from ..tasks.data import deployable
from ._modules import get_module
from .heads import HeadAttention, _is_bert_attention
from .linear_attention import is_linear, linear_log_probs

FEATURE_KINDS = ("none", "hidden", "attention", "hidden+attention")
_MHA_ARGS = (  # nn.MultiheadAttention.forward's parameters, in order
    "query",
    "key",
    "value",
    "key_padding_mask",
    "need_weights",
    "attn_mask",
    "average_attn_weights",
    "is_causal",
)


# -- where the features are -------------------------------------------------------------------------
def _is_self_attention(model: nn.Module, name: str, m: nn.Module) -> bool:
    if isinstance(m, HeadAttention):
        return True
    if isinstance(m, nn.MultiheadAttention):
        return m.bias_k is None and not m.add_zero_attn
    parent, _, attr = name.rpartition(".")
    return attr == "self" and bool(parent) and _is_bert_attention(get_module(model, parent))


def _block_of(model: nn.Module, name: str) -> str | None:
    """The encoder block holding ``name``: its nearest ancestor that is an item of a layer list."""
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        if parts[cut - 1].isdigit():
            owner = get_module(model, ".".join(parts[: cut - 1]))
            if isinstance(owner, nn.ModuleList | nn.Sequential):
                return ".".join(parts[:cut])
    return None


# query / key / value projections by their names in common encoders (BERT, MPNet, DistilBERT, ViT-style)
_QKV_NAMES = (("query", "key", "value"), ("q", "k", "v"), ("q_proj", "k_proj", "v_proj"), ("q_lin", "k_lin", "v_lin"))


def _has_qkv(m: nn.Module) -> bool:
    """An attention written with Linear query / key / value projections (whatever computes it)."""
    return any(all(isinstance(getattr(m, p, None), nn.Linear) for p in names) for names in _QKV_NAMES)


def encoder_points(model: nn.Module) -> tuple[list[str], list[str]]:
    """``(encoder blocks, attention modules)`` of ``model`` by name, in model order (see the module
    docstring); both empty for a model without transformer encoder layers. Blocks also come from
    attentions whose distributions are not recomputed here (MPNet's, with its relative position bias;
    any module with Linear ``q``/``k``/``v`` or ``query``/``key``/``value`` projections): their hidden
    states are distilled, their attention maps are not."""
    attentions, holders = [], []
    for n, m in model.named_modules():
        if n and _is_self_attention(model, n, m):
            attentions.append(n)
            holders.append(n)
        elif n and _has_qkv(m):
            holders.append(n)
    blocks = list(dict.fromkeys(b for b in map(lambda n: _block_of(model, n), holders) if b))
    return blocks, attentions


def offered(model: nn.Module) -> tuple[str, ...]:
    """The ``kd_features`` values that can apply to ``model``."""
    blocks, attentions = encoder_points(model)
    out = ["none"]
    if blocks:
        out.append("hidden")
    if attentions:
        out.append("attention")
    if blocks and attentions:
        out.append("hidden+attention")
    return tuple(out)


# -- attention distributions ------------------------------------------------------------------------
def _additive(mask: torch.Tensor, dtype, masked_is_true: bool) -> torch.Tensor:
    if mask.dtype == torch.bool:
        drop = mask if masked_is_true else ~mask
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(drop, float("-inf"))
    return mask.to(dtype)


def _log_probs(
    q: torch.Tensor, k: torch.Tensor, scale: float, mask: torch.Tensor | None, linear: bool = False
) -> torch.Tensor:
    """``log softmax(q k^T * scale + mask)`` over keys, [b, heads, n_q, n_k]; masked keys get the
    lowest finite score (a finite log-probability: a fully masked row is uniform, never NaN). ``linear``:
    the normalized weights of linear attention instead (:func:`.linear_attention.linear_log_probs`)."""
    if linear:
        return linear_log_probs(q, k, mask)
    scores = (q @ k.transpose(-2, -1)) * scale
    if mask is not None:
        scores = scores + mask
    scores = scores.nan_to_num(nan=0.0, neginf=torch.finfo(scores.dtype).min)
    return F.log_softmax(scores.float(), dim=-1)


def _mha_log_probs(m: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    bound = {**dict(zip(_MHA_ARGS, args, strict=False)), **kwargs}
    query, key = bound["query"], bound["key"]
    pad, attn_mask = bound.get("key_padding_mask"), bound.get("attn_mask")
    if query.dim() == 2:  # unbatched [tokens, features]
        query, key = query.unsqueeze(0), key.unsqueeze(0)
        pad = pad.unsqueeze(0) if pad is not None else None
    elif not m.batch_first:
        query, key = query.transpose(0, 1), key.transpose(0, 1)
    h, d = m.num_heads, m.head_dim
    if isinstance(m, HeadAttention) or m._qkv_same_embed_dim:
        wq, wk, _ = m.in_proj_weight.chunk(3)
    else:
        wq, wk = m.q_proj_weight, m.k_proj_weight
    bq, bk = m.in_proj_bias.chunk(3)[:2] if m.in_proj_bias is not None else (None, None)
    b, n_q, n_k = query.shape[0], query.shape[1], key.shape[1]
    q = F.linear(query, wq, bq).reshape(b, n_q, h, d).transpose(1, 2)
    k = F.linear(key, wk, bk).reshape(b, n_k, h, d).transpose(1, 2)
    mask = None
    if attn_mask is not None:
        mask = _additive(attn_mask, q.dtype, masked_is_true=True)
        if mask.dim() == 3:  # [batch * heads, n_q, n_k] (HeadAttention: the original heads)
            heads = m.source_heads if isinstance(m, HeadAttention) else h
            mask = mask.reshape(b, heads, n_q, n_k)
            if isinstance(m, HeadAttention):
                mask = mask[:, list(m.kept_heads)]
    elif bound.get("is_causal"):
        mask = torch.full((n_q, n_k), float("-inf"), dtype=q.dtype, device=q.device).triu(1)
    if pad is not None:
        pad = _additive(pad, q.dtype, masked_is_true=True).reshape(b, 1, 1, n_k)
        mask = pad if mask is None else mask + pad
    return _log_probs(q, k, d**-0.5, mask, is_linear(m))


def _bert_log_probs(m: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    hidden = args[0] if args else kwargs["hidden_states"]
    mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
    d = m.attention_head_size
    b, n = hidden.shape[:2]
    q, k = m.query(hidden), m.key(hidden)
    heads = q.shape[-1] // d
    q = q.reshape(b, n, heads, d).transpose(1, 2)
    k = k.reshape(b, n, heads, d).transpose(1, 2)
    if mask is not None:  # transformers' masks: additive floats, or booleans that are True where kept
        mask = _additive(mask, q.dtype, masked_is_true=False)
    return _log_probs(q, k, float(getattr(m, "scaling", d**-0.5)), mask, is_linear(m))


def attention_log_probs(module: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    """The log attention distribution ``[batch, heads, queries, keys]`` of an attention module called
    with ``args`` / ``kwargs`` (recomputed from its inputs and its query/key projections)."""
    if isinstance(module, nn.MultiheadAttention | HeadAttention):
        return _mha_log_probs(module, args, kwargs)
    return _bert_log_probs(module, args, kwargs)


def kept_heads(module: nn.Module) -> tuple[int, ...] | None:
    """The teacher's indices of a pruned attention's heads (None when unknown or not pruned)."""
    kept = getattr(module, "kept_heads", None)
    return tuple(kept) if kept else None


# -- the losses -------------------------------------------------------------------------------------
def attention_kl(
    student: torch.Tensor, teacher: torch.Tensor, kept: tuple[int, ...] | None = None
) -> torch.Tensor:
    """``KL(teacher || student)`` of log attention distributions ``[batch, heads, queries, keys]``, summed
    over keys and averaged over batch, heads and queries (0 for identical inputs).

    Different head counts: with ``kept`` (the teacher index of each student head) the teacher's kept heads
    are compared one to one; otherwise both distributions are averaged over their heads first.
    """
    teacher = teacher.detach()
    if student.shape[1] != teacher.shape[1]:
        if kept is not None and len(kept) == student.shape[1] and max(kept) < teacher.shape[1]:
            teacher = teacher[:, list(kept)]
        else:
            student = torch.logsumexp(student, 1, keepdim=True) - math.log(student.shape[1])
            teacher = torch.logsumexp(teacher, 1, keepdim=True) - math.log(teacher.shape[1])
    if student.shape != teacher.shape:
        raise TechniqueError(
            f"attention maps differ: student {tuple(student.shape)}, teacher {tuple(teacher.shape)}"
        )
    return (teacher.exp() * (teacher - student)).sum(-1).mean()


def hidden_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """The MSE between (adapted) student and teacher hidden states (0 for identical inputs)."""
    teacher = teacher.detach()
    if student.shape != teacher.shape:
        raise TechniqueError(
            f"hidden states differ: student {tuple(student.shape)}, teacher {tuple(teacher.shape)}"
        )
    return F.mse_loss(student.float(), teacher.float())


class EncoderDistill:
    """Forward hooks on a teacher and a student encoder and the feature loss between their last calls.

    Args:
        features: ``hidden``, ``attention`` or ``hidden+attention`` (see the module docstring).
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, features: str):
        if features not in FEATURE_KINDS[1:]:
            raise TechniqueError(f"kd_features {features!r} is not one of {list(FEATURE_KINDS[1:])}")
        blocks, attentions = encoder_points(student)
        t_names = dict(teacher.named_modules())
        self.blocks = [n for n in blocks if n in t_names] if "hidden" in features else []
        self.attentions = [n for n in attentions if n in t_names] if "attention" in features else []
        if not (self.blocks or self.attentions):
            raise TechniqueError(f"kd_features {features!r}: the model has no transformer encoder layers")
        self.student = student
        self.adapters = nn.ModuleDict()
        self._t: dict[str, torch.Tensor] = {}
        self._s: dict[str, torch.Tensor] = {}
        self._fastpath = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)  # the teacher's attention modules must run
        self._hooks = []
        for model, store in ((teacher, self._t), (student, self._s)):
            for n in self.blocks:
                self._hooks.append(model.get_submodule(n).register_forward_hook(self._keep(store, n)))
            for n in self.attentions:
                hook = self._attention(store, n)
                self._hooks.append(model.get_submodule(n).register_forward_hook(hook, with_kwargs=True))

    @staticmethod
    def _keep(store: dict, name: str):
        def hook(_module, _inputs, output):
            store[name] = output[0] if isinstance(output, tuple | list) else output

        return hook

    @staticmethod
    def _attention(store: dict, name: str):
        def hook(module, args, kwargs, _output):
            store[f"attn:{name}"] = attention_log_probs(module, args, kwargs)

        return hook

    def _adapter(self, name: str, s: torch.Tensor, t: torch.Tensor) -> nn.Module:
        key = name.replace(".", "__")
        if key not in self.adapters:
            same = s.shape[-1] == t.shape[-1]
            self.adapters[key] = nn.Identity() if same else nn.Linear(s.shape[-1], t.shape[-1]).to(s.device)
        return self.adapters[key]

    def hidden_loss(self) -> torch.Tensor:
        """Mean over blocks of :func:`hidden_mse` (student states through the width adapter)."""
        return torch.stack(
            [
                hidden_mse(self._adapter(n, self._s[n], self._t[n])(self._s[n]), self._t[n])
                for n in self.blocks
            ]
        ).mean()

    def attention_loss_of(self, name: str) -> torch.Tensor:
        """:func:`attention_kl` of one attention module (kept heads matched to the teacher's)."""
        kept = kept_heads(self.student.get_submodule(name))
        return attention_kl(self._s[f"attn:{name}"], self._t[f"attn:{name}"], kept)

    def attention_loss(self) -> torch.Tensor:
        """Mean over attention modules of :func:`attention_kl`."""
        return torch.stack([self.attention_loss_of(n) for n in self.attentions]).mean()

    def loss(self) -> torch.Tensor:
        """The feature loss of the last teacher and student calls: hidden + attention terms."""
        terms = []
        if self.blocks:
            terms.append(self.hidden_loss())
        if self.attentions:
            terms.append(self.attention_loss())
        return torch.stack(terms).sum()

    def parameters(self):
        return self.adapters.parameters()

    def close(self) -> None:
        """Remove the hooks and restore torch's fused attention path (idempotent)."""
        for h in self._hooks:
            h.remove()
        if self._hooks:
            torch.backends.mha.set_fastpath_enabled(self._fastpath)
        self._hooks = []
        self._t.clear()
        self._s.clear()


# -- the technique: pipeline order 55 ---------------------------------------------------------------
def encoder_kd_step(build) -> None:
    """The feature loss term of a fine-tune whose plan sets ``kd_features``; its adapters' parameters,
    their rebuild when layers shrink; the hooks go when the fine-tune ends (or fails)."""
    plan = build.plan
    if plan.kd_features == "none" or plan.kd_feature_weight <= 0 or not build.total:
        return
    distill = EncoderDistill(build.teacher, build.student, plan.kd_features)
    build.cleanup.append(distill.close)
    ts, ds = deployable(build.teacher, build.task.io), deployable(build.student, build.task.io)
    probe = build.task.example_inputs(2)

    def build_adapters() -> None:  # on one batch, so that the optimizer sees them
        if distill.blocks:
            with torch.no_grad():
                ts(*probe)
                ds(*probe)
                distill.hidden_loss()

    def rebuild() -> None:  # widths changed: adapters are rebuilt
        distill.adapters.clear()
        build_adapters()

    build_adapters()
    build.loss_terms.append(lambda: plan.kd_feature_weight * distill.loss())
    build.parameters.append(lambda: list(distill.parameters()))
    build.changed.append(rebuild)
    build.trained.append(distill.close)


def inapplicable(model: nn.Module) -> dict[str, tuple[tuple, str]]:
    """Applicability: the ``kd_features`` values a model without (enough) encoder layers cannot use."""
    can = offered(model)
    gone = tuple(v for v in FEATURE_KINDS if v not in can)
    if not gone:
        return {}
    if can == ("none",):
        why = (
            "no transformer encoder layers (nn.TransformerEncoderLayer / nn.MultiheadAttention, HeadAttention, "
            "BERT-style self-attention, Linear q/k/v projections in a layer list)"
        )
    elif "attention" not in can:
        why = (
            "its attention distributions are not recomputed here (only nn.MultiheadAttention's, "
            "HeadAttention's and BERT-style self-attention's); the blocks' hidden states are distilled"
        )
    else:
        why = "no encoder block (an item of a layer list) holds the attention modules"
    return {"kd.features": (gone, why)}


SPEC = TechniqueSpec(
    "encoder_kd",
    settings=(Dim("kd_features", "none", short="kd.features", choices=FEATURE_KINDS),),
    steps=((55, encoder_kd_step),),
    inapplicable=inapplicable,
)
TECHNIQUES.add(SPEC.name, SPEC)
