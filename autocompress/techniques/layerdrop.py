"""Layer dropping: the technique family of ``keep_layer``.

``keep_layer: false`` on the output projection of a block's attention (the layer head pruning reads:
``<block>.self_attn.out_proj`` of an ``nn.TransformerEncoderLayer``, ``<block>.attention.output.dense``
of a BERT-style layer) removes that whole block from its encoder's layer list (``nn.TransformerEncoder
.layers``, a transformers ``*Encoder.layer``); the encoder then runs the remaining layers in order, and
the distillation fine-tune that follows trains them to make up for it. Which blocks go is the search's
choice, one boolean per block. An encoder keeps at least one layer: a plan that drops all of them keeps
the first (noted). On any other layer ``keep_layer: false`` has no effect (noted).

The kept blocks stay under their teacher names (``encoder.layers.3`` is still ``encoder.layers.3`` when
``encoder.layers.1`` is gone): the list becomes a :class:`KeptLayers`, so that every other technique's
plan, note and lowering entry of a kept layer keeps meaning the same layer.

Pipeline step: order 4 (after folding, before head pruning and everything else).
"""

from __future__ import annotations

from torch import nn

from ..registry import TECHNIQUES, Dim, Probe, TechniqueSpec
from ._modules import get_module, set_module
from .heads import attention_of


class KeptLayers(nn.ModuleList):
    """A ``ModuleList`` of the layers an encoder keeps, each under its original index (its name).

    Iteration, ``len`` and positional indexing (``layers[0]``: the first kept one; slices) see the kept
    layers in order, as the encoder's forward expects of its list.
    """

    def __init__(self, kept: dict[str, nn.Module]):
        super().__init__()
        for key, module in kept.items():
            self.add_module(key, module)

    def __getitem__(self, idx):
        items = list(self._modules.values())
        if isinstance(idx, slice):
            return nn.ModuleList(items[idx])
        return items[idx]

    def __setitem__(self, idx: int, module: nn.Module) -> None:
        self.add_module(list(self._modules)[idx], module)

    def __delitem__(self, idx) -> None:
        keys = list(self._modules)
        for key in keys[idx] if isinstance(idx, slice) else [keys[idx]]:
            del self._modules[key]

    def append(self, module: nn.Module) -> KeptLayers:
        self.add_module(str(max((int(k) for k in self._modules), default=-1) + 1), module)
        return self

    def insert(self, index: int, module: nn.Module) -> None:
        raise TypeError("KeptLayers keeps the teacher's layer names: insert is not supported")


def _encoder_list(model: nn.Module, list_name: str) -> bool:
    """Whether ``list_name`` is an encoder's list of layers (run in order by its owner's forward)."""
    owner_name, _, attr = list_name.rpartition(".")
    owner = get_module(model, owner_name)
    if not isinstance(getattr(owner, attr, None), nn.ModuleList):
        return False
    if isinstance(owner, nn.TransformerEncoder):
        return attr == "layers"
    return attr == "layer" and type(owner).__name__.endswith("Encoder") and hasattr(owner, "config")


def block_of(model: nn.Module, layer: str) -> tuple[str, str] | None:
    """``(list name, key)`` of the encoder block whose attention's output projection is ``layer``."""
    if attention_of(model, layer) is None:
        return None
    parts = layer.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        list_name = ".".join(parts[: cut - 1])
        if parts[cut - 1].isdigit() and _encoder_list(model, list_name):
            return list_name, parts[cut - 1]
    return None


def drop_blocks(model: nn.Module, drop: dict[str, set[str]]) -> dict[str, list[str]]:
    """Remove the blocks ``drop[list name]`` (keys) from each encoder list, in place; an encoder keeps
    at least its first layer. Returns list name -> the keys removed."""
    removed = {}
    for list_name, keys in drop.items():
        layers = get_module(model, list_name)
        kept = {k: m for k, m in layers._modules.items() if k not in keys}
        if not kept:
            first = next(iter(layers._modules))
            kept = {first: layers._modules[first]}
        removed[list_name] = [k for k in layers._modules if k not in kept]
        set_module(model, list_name, KeptLayers(kept))
        owner = get_module(model, list_name.rpartition(".")[0])
        if isinstance(owner, nn.TransformerEncoder):
            owner.num_layers = len(kept)
    return removed


NOT_DROPPED = "layer not dropped"


def drop_step(build) -> None:
    """Pipeline order 4: the blocks planned ``keep_layer: false`` leave their encoder."""
    plan, model = build.plan, build.student
    wanted: dict[str, set[str]] = {}
    anchors: dict[tuple[str, str], str] = {}
    for name, layer in build.layers().items():
        if plan.layer(layer).keep_layer:
            continue
        block = block_of(model, name)
        if block is None:
            build.note(
                layer,
                f"{NOT_DROPPED}: {name} is not the attention output projection of a block in an encoder's "
                "layer list (nn.TransformerEncoder.layers, a BERT-style encoder.layer)",
            )
            continue
        wanted.setdefault(block[0], set()).add(block[1])
        anchors[block] = layer
    if not wanted:
        return
    before = {n: len(get_module(model, n)) for n in wanted}
    removed = drop_blocks(model, wanted)
    for list_name, keys in wanted.items():
        after = len(get_module(model, list_name))
        for key in keys:
            prefix = f"{list_name}.{key}" if list_name else key
            if key in removed[list_name]:
                build.note(
                    anchors[(list_name, key)],
                    f"layer dropped: {prefix} removed ({before[list_name]} -> {after} layers)",
                )
                for other in plan.layers:  # the block's other planned layers went with it
                    if other.startswith(prefix + ".") and other != anchors[(list_name, key)]:
                        build.note(other, f"layer dropped with {prefix}")
            else:
                build.note(
                    anchors[(list_name, key)],
                    f"{NOT_DROPPED}: the plan drops every layer of {list_name or 'the model'}, and an "
                    f"encoder keeps at least one: {prefix} stays",
                )


def probes(params: dict, info, allowed: dict) -> list[Probe]:
    """Applicability: the block dropped, alone, then with the others that pass (coupled: the model
    must still run with all of them gone but one per encoder)."""
    if False not in [bool(v) for v in params["keep_layer"].values()]:
        return []
    return [
        Probe(
            ("keep_layer",),
            "layer dropping",
            "keep_layer",
            False,
            "keep_layer false",
            {"keep_layer": False},
            coupled=True,
            skipped=(NOT_DROPPED,),
        )
    ]


def size_floor(params: dict, info, floor: dict) -> None:
    """A layer that may be dropped may hold nothing. The bound sees only the layer the field is on (the
    attention output projection): the block's other layers keep their own floors."""
    if False in [bool(v) for v in params["keep_layer"].values()]:
        floor["elements"] = 0


SPEC = TechniqueSpec(
    "layerdrop",
    dims=(Dim("keep_layer", True, short="keep", cast=bool, choices=(True, False), order=90),),
    steps=((4, drop_step),),
    probes=probes,
    collapse={"keep_layer": ("keep_layer", True)},  # dropping fails: the layer stays
    size_floor=size_floor,
)
TECHNIQUES.add(SPEC.name, SPEC)
