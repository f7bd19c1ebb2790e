"""Linear attention (autocompress.techniques.linear_attention): the kernel against its quadratic form,
padding honoured in torch and in the ONNX Runtime artifact, the plan field through the pipeline, attention
distillation on it, the refusal of a model without attention, the latency-profile row."""

from __future__ import annotations

import copy

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from autocompress.backends.onnx_export import export_onnx
from autocompress.errors import ConfigError, TechniqueError
from autocompress.pipeline import compress
from autocompress.plan import LayerPlan, Plan
from autocompress.registry import TECHNIQUES
from autocompress.search.latency_profile import layer_settings
from autocompress.space import SearchSpace
from autocompress.tasks.data import IOSpec
from autocompress.techniques.encoder_kd import attention_log_probs
from autocompress.techniques.linear_attention import (
    LinearHeadAttention,
    LinearSelfAttention,
    feature_map,
    linear_attention,
    linearize,
)
from autocompress.testing import REFERENCE_MODELS
from autocompress.testing.models import torch_encoder
from autocompress.testing.technique_suite import reference_task


def _quadratic(q, k, v, keep):
    """The same attention written as an n x n matrix of kernel weights, normalized per query."""
    a = feature_map(q) @ feature_map(k).transpose(-2, -1)
    a = a * keep[:, :, None, :]
    return (a / a.sum(-1, keepdim=True)) @ v


def test_linear_kernel_equals_its_quadratic_form_and_ignores_masked_keys():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 4, dtype=torch.float64) for _ in range(3))
    keep = torch.ones(2, 1, 7, dtype=torch.float64)
    keep[1, 0, 5:] = 0
    out = linear_attention(q, k, v, keep)
    torch.testing.assert_close(out, _quadratic(q, k, v, keep), atol=1e-5, rtol=1e-5)
    k2, v2 = k.clone(), v.clone()
    k2[1, :, 5:], v2[1, :, 5:] = 1e3, -1e3  # what a padded key holds changes nothing
    torch.testing.assert_close(linear_attention(q, k2, v2, keep), out)


class _Encoder(nn.Module):
    """nn.TransformerEncoder over [batch, tokens, 16] with a key padding mask (True = padded)."""

    def __init__(self):
        super().__init__()
        self.encoder = torch_encoder(16, 4, 32, 2)

    def forward(self, x, pad):
        return self.encoder(x, src_key_padding_mask=pad)


class _Bert(nn.Module):
    """A transformers BERT (reference model, its attention projections scaled up) called with input ids
    and an attention mask."""

    def __init__(self):
        super().__init__()
        self.bert = REFERENCE_MODELS["bert"]().bert
        with torch.no_grad():  # BERT's initial weights (std 0.02) leave attention a small share of the output
            for layer in self.bert.encoder.layer:
                for p in (layer.attention.self.query, layer.attention.self.key, layer.attention.self.value):
                    p.weight.mul_(20.0)

    def forward(self, ids, mask):
        return self.bert(input_ids=ids, attention_mask=mask).last_hidden_state


def _linearized(model: nn.Module) -> nn.Module:
    model = copy.deepcopy(model).eval()
    outs = [
        n for n, m in model.named_modules() if n.endswith(("self_attn.out_proj", "attention.output.dense"))
    ]
    assert len(outs) == 2
    for name in outs:
        linearize(model, name)
    return model


def _inputs(kind: str, n: int, pad: int):
    torch.manual_seed(1)
    if kind == "mha":
        x = torch.randn(1, n + pad, 16)
        mask = torch.zeros(1, n + pad, dtype=torch.bool)
        mask[:, n:] = True
        return (x[:, :n], mask[:, :n]), (x, mask)
    ids = torch.randint(1, 64, (1, n + pad))
    mask = torch.ones(1, n + pad, dtype=torch.long)
    mask[:, n:] = 0
    return (ids[:, :n], mask[:, :n]), (ids, mask)


@pytest.mark.parametrize("kind", ["mha", "bert"])
def test_padded_and_unpadded_inputs_agree_in_torch_and_in_onnx_runtime(kind, tmp_path):
    torch.manual_seed(0)
    teacher = (_Encoder() if kind == "mha" else _Bert()).eval()
    model = _linearized(teacher)
    cls = LinearHeadAttention if kind == "mha" else LinearSelfAttention
    assert sum(isinstance(m, cls) for m in model.modules()) == 2
    (x, m), (xp, mp) = _inputs(kind, 9, 5)
    with torch.no_grad():
        short, padded, soft = model(x, m), model(xp, mp), teacher(x, m)
    torch.testing.assert_close(padded[:, :9], short, atol=1e-5, rtol=1e-5)
    assert (short - soft).abs().max() > 1e-2  # a different model: softmax is gone
    names = ("x", "pad") if kind == "mha" else ("input_ids", "attention_mask")
    axes = {name: {0: "batch", 1: "tokens"} for name in names}
    path = tmp_path / "linear.onnx"
    export_onnx(model, (xp, mp), path, io=IOSpec(names, dynamic_axes=axes))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got_short = session.run(None, dict(zip(names, (x.numpy(), m.numpy()), strict=True)))[0]
    got_padded = session.run(None, dict(zip(names, (xp.numpy(), mp.numpy()), strict=True)))[0]
    np.testing.assert_allclose(got_short, short.numpy(), atol=1e-4, rtol=1e-4)  # ORT matches torch
    np.testing.assert_allclose(got_padded[:, :9], short.numpy(), atol=1e-4, rtol=1e-4)  # padding ignored


def test_a_per_query_mask_is_refused():
    model = _linearized(_Encoder())
    x = torch.randn(1, 4, 16)
    causal = nn.Transformer.generate_square_subsequent_mask(4)
    with pytest.raises(TechniqueError, match="honours key padding masks only"):
        model.encoder(x, mask=causal)


def test_the_plan_field_linearizes_attention_outputs_and_notes_the_other_layers():
    task = reference_task("bert", samples=16)
    teacher = task.model_fn().eval()
    layers = {
        n: LayerPlan(attention="linear") for n in ("bert.encoder.layer.1.attention.output.dense", "head")
    }
    out = compress(task, teacher, Plan(layers=layers, epochs=0))
    assert isinstance(out.model.bert.encoder.layer[1].attention.self, LinearSelfAttention)
    assert not isinstance(out.model.bert.encoder.layer[0].attention.self, LinearSelfAttention)
    assert out.notes["bert.encoder.layer.1.attention.output.dense"] == (
        "linear attention: bert.encoder.layer.1.attention.self (phi(x) = elu(x) + 1)"
    )
    assert out.notes["head"].startswith("attention kept softmax: head is not the output projection")
    assert out.model.bert.encoder.layer[1].attention.self.query is not None  # the teacher's projections kept
    torch.testing.assert_close(
        out.model.bert.encoder.layer[1].attention.self.query.weight,
        teacher.bert.encoder.layer[1].attention.self.query.weight,
    )


def test_attention_distillation_compares_the_linear_weights_and_fine_tuning_lowers_it():
    task = reference_task("bert", samples=32)
    teacher = task.model_fn().eval()
    (ids,) = task.example_inputs(2)
    sa = LinearSelfAttention(teacher.bert.encoder.layer[0].attention.self)
    hidden = teacher.bert.embeddings(input_ids=ids)
    logp = attention_log_probs(sa, (hidden,), {})
    q = sa.query(hidden).view(2, -1, 4, 8).transpose(1, 2)
    k = sa.key(hidden).view(2, -1, 4, 8).transpose(1, 2)
    w = feature_map(q) @ feature_map(k).transpose(-2, -1)
    torch.testing.assert_close(logp.exp(), w / w.sum(-1, keepdim=True), atol=1e-5, rtol=1e-4)
    out_name = "bert.encoder.layer.0.attention.output.dense"
    plan = Plan(
        layers={out_name: LayerPlan(attention="linear")},
        epochs=3,
        lr=3e-3,
        kd_features="attention",
        kd_alpha=0.0,
    )
    from autocompress.techniques.encoder_kd import EncoderDistill

    def kl(model):
        d = EncoderDistill(teacher, model, "attention")
        with torch.no_grad():
            teacher(ids), model(ids)
            value = float(d.attention_loss_of("bert.encoder.layer.0.attention.self"))
        d.close()
        return value

    before = compress(task, teacher, Plan(layers=plan.layers, epochs=0)).model
    after = compress(task, teacher, plan).model
    assert kl(after) < 0.8 * kl(before)


def test_a_space_offering_linear_attention_to_a_model_without_attention_is_refused():
    spec = TECHNIQUES.get("linear_attention")
    space = SearchSpace.from_dict({"attention": {"choices": ["softmax", "linear"]}})
    cnn = REFERENCE_MODELS["plain_cnn"]().eval()
    with pytest.raises(
        ConfigError, match=r"attention: linear is not allowed: the model has no attention module"
    ):
        spec.check_model(space, lambda: cnn, "space.yaml")
    spec.check_model(space, lambda: REFERENCE_MODELS["torch_transformer"]().eval(), "space.yaml")  # has one
    built = []
    spec.check_model(SearchSpace.from_dict({}), lambda: built.append(1), "space.yaml")
    assert not built  # softmax only: the model is not even built


def test_the_latency_profile_measures_linear_attention_where_the_space_offers_it():
    from autocompress.inventory import build_inventory

    task = reference_task("torch_transformer", samples=8)
    inv = {i.name: i for i in build_inventory(task.model_fn().eval(), task.example_inputs())}
    info = inv["encoder.layers.0.self_attn.out_proj"]
    offered = SearchSpace.from_dict({"bits": {"fixed": 32}, "attention": {"choices": ["softmax", "linear"]}})
    assert ("linear attention", {"attention": "linear"}) in layer_settings(offered, info)
    plain = SearchSpace.from_dict({"bits": {"fixed": 32}})
    assert all(label != "linear attention" for label, _ in layer_settings(plain, info))


def test_applicability_keeps_linear_attention_on_attention_outputs_only():
    from autocompress.backends import OnnxRuntimeBackend
    from autocompress.inventory import build_inventory
    from autocompress.search.applicability import check_applicability

    task = reference_task("torch_transformer", samples=16)
    teacher = task.model_fn().eval()
    inv = build_inventory(teacher, task.example_inputs())
    fixed = {"sparsity": {"fixed": 0.0}, "rank_ratio": {"fixed": 1.0}, "bits": {"fixed": 32}}
    space = SearchSpace.from_dict({**fixed, "attention": {"choices": ["softmax", "linear"]}})
    be = OnnxRuntimeBackend()
    try:
        result = check_applicability(task, teacher, inv, space, be)
    finally:
        be.close()
    attention = {i.name for i in inv if i.name.endswith("self_attn.out_proj")}
    checks = {c.layer: c.status for c in result.checks if c.technique == "linear attention"}
    assert checks == {i.name: "ok" if i.name in attention else "no effect" for i in inv}
    space.narrow(result.domains)
    for i in inv:
        offered = [str(v) for v in space._layer_params(i.name)["attention"].values()]
        assert ("linear" in offered) == (i.name in attention), (i.name, offered)


def test_a_run_offering_linear_attention_to_a_model_without_attention_is_refused_with_one_line(
    tmp_path, monkeypatch
):
    import yaml
    from conftest import ROOT
    from refusal_helpers import one_line, run_cli, snapshot

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    study = tmp_path / "study.yaml"
    study.write_text(
        yaml.safe_dump(
            {
                "name": "linear",
                "task": {"name": "tiny_tasks:trained_mlp"},
                "space": {
                    "file": str(ROOT / "autocompress/search_spaces/default.yaml"),
                    "overrides": {"attention": {"choices": ["softmax", "linear"]}},
                },
                "trials": {"n": 1},
                "output": str(tmp_path / "run"),
            }
        )
    )
    before = snapshot(tmp_path)
    rc, _, err = run_cli("run", study)
    line = one_line(err)
    assert rc == 2
    assert line == (
        f"error: {ROOT / 'autocompress/search_spaces/default.yaml'} (+ overrides in {study}): attention: linear "
        "is not allowed: the model has no attention module (nn.MultiheadAttention, HeadAttention, BERT-style "
        "self-attention) whose output projection is a compressible layer"
    )
    assert snapshot(tmp_path) == before  # nothing written
