"""The technique conformance suite's checks of the transformer techniques (head pruning, layer
dropping, linear attention): the plans of :data:`TRANSFORMER_TECHNIQUES` on the reference models with attention
(``torch_transformer``, ``bert``), and what must then hold of the compressed model, layer by layer.

The checks take a :class:`~autocompress.testing.technique_suite.TechniqueCase` (this module does not
import that one: the suite imports these).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from ..inventory import compressible_layers
from ..plan import LayerPlan
from ..techniques._modules import get_module
from ..techniques.heads import attention_of, head_count, heads_to_keep
from ..techniques.layerdrop import block_of
from ..techniques.linear_attention import is_linear
from ._check import check

LayerPlanFn = Callable[[int, str], LayerPlan]

# the transformer techniques (reference models with attention: torch_transformer, bert); every block
# planned away, so that one stays per encoder
TRANSFORMER_TECHNIQUES: dict[str, LayerPlanFn] = {
    "heads": lambda i, name: LayerPlan(heads_kept=0.5),
    "layerdrop": lambda i, name: LayerPlan(keep_layer=False),
    "heads+layerdrop+int8": lambda i, name: LayerPlan(
        heads_kept=0.5, keep_layer=False, bits=8, quant_mode="dynamic"
    ),
    "linear_attention": lambda i, name: LayerPlan(attention="linear"),
    "linear_attention+heads": lambda i, name: LayerPlan(attention="linear", heads_kept=0.5),
}


def _part(note: str, *starts: str) -> str:
    """The part of a layer's note (parts joined by ``; ``) that starts with one of ``starts``."""
    return next((p for p in note.split("; ") if p.startswith(starts)), "")


def check_heads_pruned(case: Any) -> None:
    """Each attention planned ``heads_kept < 1`` has ``ceil(heads_kept * heads)`` heads of the same
    head_dim, as its note says; on any other layer the note says it is no attention output."""
    for name, _ in compressible_layers(case.teacher):
        fraction, note = case.plan.layer(name).heads_kept, case.out.notes.get(name, "")
        dropped, note = _part(note, "layer dropped"), _part(note, "heads")
        found = attention_of(case.teacher, name)
        if fraction >= 1.0 or dropped:
            continue
        if found is None:
            check(
                note.startswith("heads not pruned") and "is not the output projection" in note, (name, note)
            )
            continue
        heads, head_dim = head_count(found[1])
        now = attention_of(case.model, name)
        check(now is not None, f"{name}: no attention left")
        keep = heads_to_keep(fraction, heads)
        check(head_count(now[1]) == (keep, head_dim), (name, head_count(now[1]), keep))
        check(get_module(case.model, name).in_features == keep * head_dim, name)
        check(note.startswith(f"heads: {heads} -> {keep} "), (name, note))


def check_layers_dropped(case: Any) -> None:
    """Each block planned ``keep_layer: false`` is gone from the model as its note says, or its note says
    truly why not (no encoder block; the last one its encoder keeps)."""
    names = {n for n, _ in case.model.named_modules()}
    for name, _ in compressible_layers(case.teacher):
        if case.plan.layer(name).keep_layer:
            continue
        note = _part(case.out.notes.get(name, ""), "layer dropped", "layer not dropped")
        block = block_of(case.teacher, name)
        if block is None:
            check(
                note.startswith("layer not dropped") and "is not the attention output" in note, (name, note)
            )
            continue
        prefix = f"{block[0]}.{block[1]}" if block[0] else block[1]
        m = re.fullmatch(r"layer dropped: (\S+) removed \((\d+) -> (\d+) layers\)", note)
        if m:
            check(m[1] == prefix and prefix not in names and name not in names, (name, note))
            check(len(get_module(case.model, block[0])) == int(m[3]) < int(m[2]), (name, note))
        else:
            check(note.startswith("layer not dropped") and "keeps at least one" in note, (name, note))
            check(prefix in names and len(get_module(case.model, block[0])) == 1, (name, note))


def check_linear_attention(case: Any) -> None:
    """Each attention planned ``attention: linear`` computes linear attention in the compressed model, as
    its note says; on any other layer the note says it is no attention output."""
    for name, _ in compressible_layers(case.teacher):
        if case.plan.layer(name).attention != "linear":
            continue
        note = _part(case.out.notes.get(name, ""), "linear attention", "attention kept softmax")
        if attention_of(case.teacher, name) is None:
            check(
                note.startswith("attention kept softmax") and "is not the output projection" in note,
                (name, note),
            )
            continue
        now = attention_of(case.model, name)
        check(now is not None, f"{name}: no attention left")
        module = now[1] if hasattr(now[1], "in_proj_weight") else now[1].self
        check(is_linear(module), (name, type(module).__name__))
        check(note.startswith("linear attention: ") and "elu(x) + 1" in note, (name, note))
