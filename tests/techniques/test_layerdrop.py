"""Layer dropping (``autocompress.techniques.layerdrop``): the compressed encoder equals running the
remaining layers, kept layers keep their teacher names, an encoder keeps one layer; the field in plans,
notes and the applicability check."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from autocompress.backends import OnnxRuntimeBackend
from autocompress.errors import ConfigError
from autocompress.inventory import build_inventory
from autocompress.pipeline import compress
from autocompress.plan import LayerPlan, Plan
from autocompress.search.applicability import check_applicability
from autocompress.space import SearchSpace
from autocompress.techniques import KeptLayers, block_of, drop_blocks
from autocompress.testing import BertClassifier
from autocompress.testing.technique_suite import reference_task


def _encoder(depth: int = 3) -> nn.TransformerEncoder:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    enc = nn.TransformerEncoder(layer, depth, norm=nn.LayerNorm(16), enable_nested_tensor=False)
    for m in enc.modules():
        if isinstance(m, nn.Linear):
            m.reset_parameters()
    return enc.eval()


def test_dropping_equals_running_the_remaining_layers():
    enc = _encoder()
    x = torch.randn(2, 5, 16)
    assert block_of(enc, "layers.1.self_attn.out_proj") == ("layers", "1")
    assert block_of(enc, "layers.1.linear1") is None
    dropped = copy.deepcopy(enc)
    assert drop_blocks(dropped, {"layers": {"1"}}) == {"layers": ["1"]}
    with torch.no_grad():
        want = enc.norm(enc.layers[2](enc.layers[0](x)))
    torch.testing.assert_close(dropped(x), want, atol=1e-6, rtol=0)
    assert isinstance(dropped.layers, KeptLayers) and dropped.num_layers == 2 and len(dropped.layers) == 2
    assert dropped.layers[0] is dropped.get_submodule("layers.0")
    assert dropped.layers[-1] is dropped.get_submodule("layers.2")  # the teacher's name stays
    assert [type(m) for m in dropped.layers[:1]] == [nn.TransformerEncoderLayer]
    assert "layers.1.linear1" not in dict(dropped.named_modules())
    dropped.layers.append(nn.Identity())
    assert list(dropped.layers._modules) == ["0", "2", "3"]


def test_dropping_bert_layers_equals_the_remaining_ones():
    torch.manual_seed(0)
    teacher = BertClassifier(depth=3).eval()
    ids = BertClassifier.example_inputs(2)[0]
    dropped, manual = copy.deepcopy(teacher), copy.deepcopy(teacher)
    assert block_of(teacher, "bert.encoder.layer.2.attention.output.dense") == ("bert.encoder.layer", "2")
    drop_blocks(dropped, {"bert.encoder.layer": {"0", "2"}})
    manual.bert.encoder.layer = nn.ModuleList([manual.bert.encoder.layer[1]])
    torch.testing.assert_close(dropped(ids), manual(ids), atol=1e-6, rtol=0)
    assert [n for n, _ in dropped.bert.encoder.layer.named_children()] == ["1"]


def test_pipeline_keeps_names_notes_and_one_layer():
    task = reference_task("torch_transformer")
    teacher = task.model_fn().eval()
    plan = Plan(
        layers={
            "encoder.layers.0.self_attn.out_proj": LayerPlan(keep_layer=False),
            "encoder.layers.0.linear1": LayerPlan(bits=8),  # goes with its block
            "encoder.layers.1.linear1": LayerPlan(bits=8),  # stays, under its teacher name
            "head": LayerPlan(keep_layer=False),
        },
        epochs=0,
    )
    out = compress(task, teacher, plan)
    notes = out.notes
    assert (
        notes["encoder.layers.0.self_attn.out_proj"]
        == "layer dropped: encoder.layers.0 removed (2 -> 1 layers)"
    )
    assert notes["encoder.layers.0.linear1"] == "layer dropped with encoder.layers.0"
    assert notes["head"].startswith("layer not dropped: head is not the attention output projection")
    assert set(out.lowering.quantized()) == {"encoder.layers.1.linear1"}
    x = task.test[0][:4]
    with torch.no_grad():
        want = teacher.head(teacher.encoder.layers[1](teacher.embed(teacher._patches(x))).mean(dim=1))
    only = Plan(layers={"encoder.layers.0.self_attn.out_proj": LayerPlan(keep_layer=False)}, epochs=0)
    torch.testing.assert_close(compress(task, teacher, only).model(x), want, atol=1e-5, rtol=0)
    every = {f"encoder.layers.{i}.self_attn.out_proj": LayerPlan(keep_layer=False) for i in range(2)}
    out = compress(task, teacher, Plan(layers=every, epochs=0))
    assert "encoder.layers.0" in dict(out.model.named_modules()) and len(out.model.encoder.layers) == 1
    assert "an encoder keeps at least one: encoder.layers.0 stays" in notes_of(out, 0)
    with pytest.raises(
        ConfigError, match=r"layers.a.keep_layer: keep_layer 'no' is not one of \[True, False\]"
    ):
        Plan(layers={"a": LayerPlan(keep_layer="no")})


def notes_of(out, i: int) -> str:
    return out.notes[f"encoder.layers.{i}.self_attn.out_proj"]


def test_applicability_keeps_the_choice_on_blocks_only():
    task = reference_task("torch_transformer")
    teacher = task.model_fn().eval()
    inv = build_inventory(teacher, task.example_inputs())
    space = SearchSpace.from_dict(
        {
            "bits": {"fixed": 32},
            "sparsity": {"fixed": 0.0},
            "rank_ratio": {"fixed": 1.0},
            "layers": {
                ".*(out_proj|head)": {
                    "keep_layer": {"choices": [True, False]},
                    "heads_kept": {"choices": [1.0, 0.5]},
                }
            },
        }
    )
    backend = OnnxRuntimeBackend()
    try:
        result = check_applicability(task, teacher, inv, space, backend)
    finally:
        backend.close()
    status = {(c.layer, c.technique): c.status for c in result.checks}
    anchors = {f"encoder.layers.{i}.self_attn.out_proj" for i in range(2)}
    for layer in [*anchors, "head"]:  # the layers whose domain allows them
        for technique in ("layer dropping", "head pruning"):
            assert status[(layer, technique)] == ("ok" if layer in anchors else "no effect")
    assert len(status) == 6
    assert result.domains == {"keep.head": {"fixed": True}, "heads.head": {"fixed": 1.0}}
