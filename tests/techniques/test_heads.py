"""Attention head pruning (``autocompress.techniques.heads``): pruning heads equals masking them, for
``nn.MultiheadAttention`` (alone and in ``nn.TransformerEncoderLayer``) and a transformers BERT; the
ONNX artifact of a pruned model agrees with torch; the field in plans, spaces and errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from autocompress.backends import OnnxRuntimeBackend
from autocompress.errors import ConfigError, TechniqueError
from autocompress.inventory import build_inventory
from autocompress.pipeline import compress
from autocompress.plan import LayerPlan, Plan
from autocompress.search.preflight import min_artifact_bytes
from autocompress.space import SearchSpace
from autocompress.techniques import HeadAttention, head_scores, heads_to_keep, prune_heads
from autocompress.testing import BertClassifier, PlainCNN, TorchTransformer
from autocompress.testing.backend_suite import lower
from autocompress.testing.technique_suite import reference_task


def _masked(model: nn.Module, weight: torch.Tensor, kept: list[int], head_dim: int) -> nn.Module:
    """``model`` with the output-projection columns of every head not in ``kept`` zeroed (in place)."""
    with torch.no_grad():
        for h in range(weight.shape[1] // head_dim):
            if h not in kept:
                weight[:, h * head_dim : (h + 1) * head_dim] = 0
    return model


class _Wrap(nn.Module):  # an nn.MultiheadAttention under the name "attn" (out_proj: "attn.out_proj")
    def __init__(self, attn: nn.Module):
        super().__init__()
        self.attn = attn

    def forward(self, x, **kw):
        return self.attn(x, x, x, need_weights=False, **kw)[0]


@pytest.mark.parametrize("batch_first", [True, False])
def test_pruning_mha_heads_equals_masking_them(batch_first):
    torch.manual_seed(0)
    model = _Wrap(nn.MultiheadAttention(32, 4, batch_first=batch_first)).eval()
    with torch.no_grad():  # make the heads' norms distinct
        model.attn.out_proj.weight.mul_(torch.arange(1, 33).float().repeat(32, 1) / 32)
    pruned = copy.deepcopy(model)
    heads, kept = prune_heads(pruned, "attn.out_proj", 2)
    assert (heads, kept) == (4, [2, 3])  # the two heads with the largest output-projection columns
    assert isinstance(pruned.attn, HeadAttention) and pruned.attn.num_heads == 2
    assert pruned.attn.in_proj_weight.shape == (48, 32) and pruned.attn.out_proj.weight.shape == (32, 16)
    masked = copy.deepcopy(model)
    _masked(masked, masked.attn.out_proj.weight, kept, 8)
    x = torch.randn(3, 7, 32) if batch_first else torch.randn(7, 3, 32)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[1, 5:] = True
    causal = torch.triu(torch.ones(7, 7, dtype=torch.bool), 1)
    per_head = torch.randn(3 * 4, 7, 7)  # a float mask per (batch, original head)
    for kw in (
        {},
        {"key_padding_mask": pad},
        {"attn_mask": causal, "key_padding_mask": pad},
        {"attn_mask": per_head},
    ):
        got, want = pruned(x, **kw), masked(x, **kw)
        assert got.shape == x.shape
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_pruned_encoder_layer_equals_masked_in_train_and_eval():
    torch.manual_seed(0)
    teacher = TorchTransformer(dim=32, heads=4).eval()
    x = TorchTransformer.example_inputs(4)[0]
    pruned, masked = copy.deepcopy(teacher), copy.deepcopy(teacher)
    _, kept = prune_heads(pruned, "encoder.layers.1.self_attn.out_proj", 1)
    _masked(masked, masked.encoder.layers[1].self_attn.out_proj.weight, kept, 8)
    for mode in (False, True):  # eval (the encoder layer's fast path must not be taken) and train
        pruned.train(mode), masked.train(mode)
        torch.testing.assert_close(pruned(x), masked(x), atol=1e-5, rtol=0)
    assert pruned.encoder.layers[1].self_attn.num_heads == 1 and pruned(x).shape == (4, 10)


def test_pruned_bert_heads_equal_masked_ones():
    torch.manual_seed(0)
    teacher = BertClassifier().eval()
    ids = BertClassifier.example_inputs(3)[0]
    pruned, masked = copy.deepcopy(teacher), copy.deepcopy(teacher)
    heads, kept = prune_heads(pruned, "bert.encoder.layer.0.attention.output.dense", 3)
    attention = pruned.bert.encoder.layer[0].attention
    assert heads == 4 and len(kept) == 3 and attention.self.query.out_features == 24
    assert attention.output.dense.in_features == 24 and attention.self.num_attention_heads == 3
    _masked(masked, masked.bert.encoder.layer[0].attention.output.dense.weight, kept, 8)
    torch.testing.assert_close(pruned(ids), masked(ids), atol=1e-5, rtol=0)


def test_head_scores_and_counts():
    w = torch.zeros(4, 6)
    w[:, 2:4] = 1.0  # head 1 of three heads of 2
    assert head_scores(w, 2).tolist() == [0.0, pytest.approx(8**0.5), 0.0]
    assert [heads_to_keep(f, 8) for f in (1.0, 0.5, 0.3, 0.01)] == [8, 4, 3, 1]
    with pytest.raises(TechniqueError, match=r"heads_kept 0 is outside \(0, 1\]"):
        heads_to_keep(0, 8)


def test_errors_name_the_rule():
    model = _Wrap(nn.MultiheadAttention(16, 4))
    with pytest.raises(TechniqueError, match="'attn' is not the output projection of an attention module"):
        prune_heads(model, "attn", 2)
    with pytest.raises(TechniqueError, match="cannot keep 0 of the 4 heads of 'attn'"):
        prune_heads(model, "attn.out_proj", 0)
    with pytest.raises(TechniqueError, match=r"key/value widths differ from the query's \(kdim/vdim\)"):
        prune_heads(_Wrap(nn.MultiheadAttention(16, 4, kdim=8, vdim=8)), "attn.out_proj", 2)
    with pytest.raises(TechniqueError, match="add_bias_kv / add_zero_attn are not supported"):
        prune_heads(_Wrap(nn.MultiheadAttention(16, 4, add_bias_kv=True)), "attn.out_proj", 2)
    with pytest.raises(ConfigError, match=r"layers.a.heads_kept: heads_kept 1.5 is outside \(0, 1\]"):
        Plan(layers={"a": LayerPlan(heads_kept=1.5)})
    with pytest.raises(ConfigError, match=r"heads_kept: 0 is outside \(0, 1\]"):
        SearchSpace.from_dict({"heads_kept": {"choices": [0, 0.5]}})


def _agrees_with_onnxruntime(model: nn.Module, x: torch.Tensor, tmp_path) -> None:
    """``model`` lowered by the ORT backend (at batch 1) gives torch's outputs on the batch ``x``."""
    backend = OnnxRuntimeBackend()
    try:
        art = lower(backend, model, (x[:1],), tmp_path)
        got = backend.runner(art)((x.numpy(),))
    finally:
        backend.close()
    torch.testing.assert_close(torch.as_tensor(got), model(x).detach(), atol=1e-5, rtol=1e-4)


def test_pruned_model_lowers_to_onnx_and_agrees(tmp_path):
    torch.manual_seed(0)
    model = TorchTransformer(dim=32, heads=4).eval()
    prune_heads(model, "encoder.layers.0.self_attn.out_proj", 2)
    x = TorchTransformer.example_inputs(5)[0]
    _agrees_with_onnxruntime(model, x, tmp_path)


def test_the_default_space_asks_heads_on_attention_outputs_only():
    import optuna

    space = SearchSpace.from_file("autocompress/search_spaces/default.yaml")
    for cls, asked in ((TorchTransformer, True), (PlainCNN, False)):
        inv = build_inventory(cls().eval(), cls.example_inputs())
        trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
        plan = space.suggest(trial, inv, epochs=0, lr=1e-3, seed=0)
        ours = {k for k in trial.params if k.startswith(("heads.", "keep."))}
        assert all(k.endswith("self_attn.out_proj") for k in ours) and bool(ours) == asked
        assert Plan.from_json(plan.to_json()) == plan
    bound = min_artifact_bytes(space, inv)  # PlainCNN: no attention, the bound of a space without them
    assert bound == min_artifact_bytes(SearchSpace.from_dict({**_default(), "layers": {}}), inv)
    inv = build_inventory(TorchTransformer().eval(), TorchTransformer.example_inputs())
    assert min_artifact_bytes(space, inv) < min_artifact_bytes(
        SearchSpace.from_dict({**_default(), "layers": {}}), inv
    )


def _default() -> dict:
    import yaml

    with open("autocompress/search_spaces/default.yaml") as f:
        return yaml.safe_load(f)


def test_pipeline_notes():
    task = reference_task("torch_transformer")
    teacher = task.model_fn().eval()
    plan = Plan(
        layers={
            "head": LayerPlan(heads_kept=0.5),
            "encoder.layers.0.self_attn.out_proj": LayerPlan(heads_kept=0.6),
        },
        epochs=0,
    )
    out = compress(task, teacher, plan)
    assert out.notes["encoder.layers.0.self_attn.out_proj"].startswith("heads: 4 -> 3 (kept ")
    assert out.notes["head"].startswith("heads not pruned: head is not the output projection")


def test_channel_pruning_of_the_model_width_goes_through_pruned_heads(tmp_path):
    """Structured pruning of the embedding (the residual stream every attention reads and writes) after
    heads went: torch-pruning narrows HeadAttention's packed projection's inputs and out_proj's outputs
    (registered pruner); the heads keep their width, the model runs, lowers and agrees with ONNX Runtime."""
    from autocompress.techniques.structured import prune_channels

    torch.manual_seed(0)
    model = TorchTransformer(dim=32, heads=4).eval()
    prune_heads(model, "encoder.layers.0.self_attn.out_proj", 2)
    x = TorchTransformer.example_inputs(5)[0]
    changed = prune_channels(model, (x[:1],), {"embed": 0.25})
    assert changed["embed"] == (32, 24)
    attn = model.encoder.layers[0].self_attn
    assert isinstance(attn, HeadAttention) and (attn.num_heads, attn.head_dim, attn.embed_dim) == (2, 8, 24)
    assert attn.in_proj_weight.shape == (3 * 16, 24) and attn.out_proj.weight.shape == (24, 16)
    assert model.encoder.layers[1].self_attn.embed_dim == 24  # torch's own attention, pruned by torch-pruning
    assert model(x).shape == (5, 10)
    _agrees_with_onnxruntime(model, x, tmp_path)
