"""Coverage: the share of a model's parameters (and of its multiply-accumulates at batch 1) that the
(narrowed) search space can change, and every part it cannot, with the reason: a recurrent layer, an
``nn.EmbeddingBag`` or an embedding table with ``max_norm``, the packed input projection of
``nn.MultiheadAttention``, a layer every technique was excluded from by the applicability check
(:mod:`.applicability`)."""

from __future__ import annotations

import torch
from torch import nn

from ..inventory import MATMUL, LayerInfo, layer_kind
from ..registry import TECHNIQUES
from ..space import SearchSpace
from ..tasks import Task
from ..tasks.data import deployable
from .applicability import Applicability

_GATES = {nn.LSTM: 4, nn.GRU: 3, nn.RNN: 1}


def _reason(module: nn.Module) -> str:
    if isinstance(module, nn.RNNBase):
        return (
            f"recurrent layer (nn.{type(module).__name__}): the search space expands over Conv1d/Conv2d/"
            "Linear layers and embedding tables only; it can be quantized (dynamic int8) only by a "
            "hand-written plan"
        )
    if isinstance(module, nn.EmbeddingBag):
        return "embedding bag (a lookup with a reduction): not in the search space; stays float"
    if isinstance(module, nn.Embedding):
        return (
            "embedding table with max_norm (its forward renormalizes the table in place): not in the "
            "search space; stays float"
        )
    if isinstance(module, nn.MultiheadAttention):
        return (
            "nn.MultiheadAttention's packed query/key/value projection (in_proj_weight) is a bare "
            "parameter, not a Linear layer: stays float"
        )
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return "BatchNorm: folded into the preceding conv before lowering"
    if isinstance(module, nn.LayerNorm | nn.GroupNorm):
        return "normalization layer: stays float"
    names = ", ".join(n for n, _ in module.named_parameters(recurse=False))
    return f"free parameters of {type(module).__name__} ({names}): not a layer the search expands over; stays float"


def _touchable(space: SearchSpace, info: LayerInfo) -> bool:
    """Whether some registered technique's domains can change the layer (it has an applicability probe)."""
    params = space.layer_params(info)
    return any(
        t.probes(params, info, space.allowed_by_kind) for t in TECHNIQUES.specs() if t.probes is not None
    )


def _macs(model: nn.Module, task: Task) -> dict[str, float]:
    """Multiply-accumulates per layer at batch 1, counted from the shapes each layer sees (forward hooks):
    Conv1d/Conv2d/Linear (an embedding lookup has none), nn.MultiheadAttention (input projection and
    attention under its own name, the output projection under ``<name>.out_proj``) and LSTM/GRU/RNN;
    matmuls written in a forward (``q @ k.T``) are not seen."""
    macs: dict[str, float] = {}

    def layer(name):
        def count(m, _inputs, out):
            if torch.is_tensor(out):
                macs[name] = macs.get(name, 0.0) + out.numel() * m.weight[0].numel()

        return count

    def attention(name):
        def count(m, args, kwargs, _out):
            q, k = (list(args) + [kwargs.get("query"), kwargs.get("key")])[:2]
            e, kdim, vdim = m.embed_dim, m.kdim, m.vdim
            tokens_q, tokens_k = q.numel() // e, k.numel() // kdim
            seq_k = k.shape[1] if m.batch_first else k.shape[0]
            proj = tokens_q * e * e + tokens_k * (kdim + vdim) * e
            macs[name] = macs.get(name, 0.0) + proj + 2 * tokens_q * seq_k * e  # q k^T and the weighted v
            macs[f"{name}.out_proj"] = macs.get(f"{name}.out_proj", 0.0) + tokens_q * e * e

        return count

    def recurrent(name):
        def count(m, inputs, _out):
            x = inputs[0]
            if not torch.is_tensor(x) or x.dim() < 2:
                return
            steps, batch = (x.shape[1], x.shape[0]) if m.batch_first else (x.shape[0], x.shape[1])
            dirs = 2 if m.bidirectional else 1
            total, width = 0.0, m.input_size
            for _ in range(m.num_layers):
                total += _GATES.get(type(m), 1) * m.hidden_size * (width + m.hidden_size) * steps * batch
                width = m.hidden_size * dirs
            macs[name] = macs.get(name, 0.0) + total * dirs

        return count

    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            hooks.append(m.register_forward_hook(attention(name), with_kwargs=True))
        elif isinstance(m, MATMUL):  # an embedding table is a lookup: no multiply-accumulates
            hooks.append(m.register_forward_hook(layer(name)))
        elif isinstance(m, nn.RNNBase):
            hooks.append(m.register_forward_hook(recurrent(name)))
    try:
        with torch.no_grad():
            deployable(model, task.io)(*task.example_inputs())
    finally:
        for h in hooks:
            h.remove()
    return macs


def coverage(
    model: nn.Module, task: Task, inventory: list[LayerInfo], space: SearchSpace, result: Applicability | None
) -> dict:
    """What share of ``model`` the (narrowed) ``space`` can change, and what it cannot with the reason.

    Returns a JSON-able dict: ``params_total``, ``params_touched``, ``params_share``, ``macs_total``,
    ``macs_touched``, ``macs_share`` (batch 1, see :func:`_macs`), ``untouched``: rows
    ``{part, type, modules, params, share, reason}`` from the largest.
    """
    excluded: dict[str, list[str]] = {}
    for c in result.excluded if result is not None else []:
        excluded.setdefault(c.layer, []).append(c.technique)
    names = {i.name for i in inventory}
    touched = {i.name for i in inventory if _touchable(space, i)}
    unused = getattr(inventory, "unused", {})  # not in the exported graph: outside the coverage too
    seen: set[int] = set()
    owned: dict[str, int] = {}
    for mname, m in model.named_modules():
        if mname in unused:
            continue
        n = 0
        for p in m.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                n += p.numel()
        if n:
            owned[mname] = n
    total = sum(owned.values())
    params_touched = sum(owned.get(n, 0) for n in touched)
    modules = dict(model.named_modules())
    rows: dict[tuple[str, str], dict] = {}
    for mname, n in owned.items():
        if mname in touched:
            continue
        m = modules[mname]
        if mname in names:
            why = (
                f"every technique the space offers is excluded here ({', '.join(excluded[mname])})"
                if mname in excluded
                else "the space fixes this layer (float, dense, full rank)"
            )
        elif layer_kind(m) is not None:
            why = "not in the inventory"
        else:
            why = _reason(m)
        key = (type(m).__name__, why)
        row = rows.setdefault(key, {"type": key[0], "modules": [], "params": 0, "reason": why})
        row["modules"].append(mname or "(model)")
        row["params"] += n
    untouched = sorted(rows.values(), key=lambda r: -r["params"])
    for r in untouched:
        r["share"] = r["params"] / total if total else 0.0
        shown = r["modules"][:3]
        r["part"] = ", ".join(shown) + (f" (+{len(r['modules']) - 3} more)" if len(r["modules"]) > 3 else "")
    per = {k: v for k, v in _macs(model, task).items() if k not in unused}
    macs_total = sum(per.values())
    macs_touched = sum(per.get(n, 0.0) for n in touched)
    return {
        "params_total": total,
        "params_touched": params_touched,
        "params_share": params_touched / total if total else 0.0,
        "macs_total": macs_total,
        "macs_touched": macs_touched,
        "macs_share": (macs_touched / macs_total) if macs_total else None,
        "layers_touched": sorted(touched),
        "untouched": untouched,
    }


def coverage_lines(cov: dict) -> list[str]:
    """The log lines of a coverage: the shares, then one line per part the search cannot touch."""
    macs = f" and {cov['macs_share']:.1%} of its MACs" if cov.get("macs_share") is not None else ""
    lines = [
        f"coverage: the search can change {cov['params_share']:.1%} of the model's parameters "
        f"({cov['params_touched']:,} of {cov['params_total']:,}){macs}"
        + ("; it cannot change:" if cov["untouched"] else "")
    ]
    for r in cov["untouched"]:
        lines.append(
            f"  {r['part']} ({r['type']}, {r['params']:,} parameters, {r['share']:.1%}): {r['reason']}"
        )
    return lines
