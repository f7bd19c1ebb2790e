"""Least-squares reconstruction after structured pruning (``autocompress.techniques.reconstruct``): the
refit recovers what a linear consumer can recover exactly, helps a BERT with heads and FFN neurons
removed, never makes a layer worse, runs only one shot and only when the plan asks; the plan and space
field."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from autocompress import Task
from autocompress.errors import ConfigError
from autocompress.pipeline import compress
from autocompress.plan import LayerPlan, Plan, Schedule
from autocompress.techniques.reconstruct import narrowed_linears, refit


def _affine_task() -> Task:
    """Linear(4, 16) -> Linear(16, 3): the hidden units are affine maps of a 4-dim input, so 8 kept units
    still span every affine function of it and the second layer can be refit exactly."""
    torch.manual_seed(0)
    x = torch.randn(256, 4)
    model = nn.Sequential(nn.Linear(4, 16), nn.Linear(16, 3)).eval()
    with torch.no_grad():
        y = model(x).argmax(1)
    data = TensorDataset(x, y)
    return Task(
        name="affine",
        model=model,
        train=DataLoader(data, batch_size=32),
        test=DataLoader(data, batch_size=32),
        metric="accuracy",
    )


def _plan(reconstruct: bool, **kw) -> Plan:
    return Plan(
        layers={"0": LayerPlan(bits=32, sparsity=0.5, sparsity_kind="structured")},
        epochs=0,
        reconstruct=reconstruct,
        **kw,
    )


def test_refit_recovers_a_linear_consumer_exactly():
    task = _affine_task()
    teacher = task.teacher()
    x = torch.randn(64, 4)
    with torch.no_grad():
        ref = teacher(x)
    plain = compress(task, teacher, _plan(False)).model
    fixed = compress(task, teacher, _plan(True))
    assert fixed.model[0].out_features == 8 and fixed.model[1].in_features == 8
    with torch.no_grad():
        err_plain = float((plain(x) - ref).abs().max() / ref.abs().max())
        err_fixed = float((fixed.model(x) - ref).abs().max() / ref.abs().max())
    assert err_plain > 0.05  # half the units gone: the output is clearly off
    assert err_fixed < 1e-3  # refit on the kept 8: the same affine map again
    assert fixed.notes["1"].startswith("reconstructed: output error ")
    assert "-> 0.000" in fixed.notes["1"]


def test_batches_of_other_lengths_are_refit_layer_by_layer():
    """Token batches of different sequence lengths do not concatenate into one calibration batch, so the
    refit reads each layer's inputs batch by batch (one pass per layer): still the exact affine refit."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Linear(16, 3)).eval()
    batches = [(torch.randn(8, t, 4),) for t in (5, 7, 3, 9)]  # [batch, tokens, features]
    task = Task(
        name="tokens",
        model=model,
        train=DataLoader(batches, batch_size=None),
        test=DataLoader(batches, batch_size=None),
        metric="fidelity",
        loss="cosine",
        targets=None,
        inputs=lambda b: (b[0],),
    )
    with pytest.raises(RuntimeError, match="Sizes of tensors must match"):
        task.train_split.first(32)  # what sends reconstruct_step to its batch-by-batch path
    teacher = task.teacher()
    plain = compress(task, teacher, _plan(False)).model
    fixed = compress(task, teacher, _plan(True))
    x = torch.randn(4, 6, 4)
    with torch.no_grad():
        ref = teacher(x)
        err_plain = float((plain(x) - ref).abs().max() / ref.abs().max())
        err_fixed = float((fixed.model(x) - ref).abs().max() / ref.abs().max())
    assert fixed.model[1].in_features == 8
    assert err_plain > 0.05 and err_fixed < 1e-3, (err_plain, err_fixed)
    assert "-> 0.000" in fixed.notes["1"]


def test_iterative_schedule_refits_nothing():
    task = _affine_task()
    teacher = task.teacher()
    out = compress(task, teacher, _plan(True, schedule=Schedule("cubic", 0.0, 0.5), steps=2, lr=1e-3))
    assert out.model[1].in_features == 8
    assert "reconstructed" not in out.notes.get("1", "")


def test_refit_never_makes_a_layer_worse():
    torch.manual_seed(0)
    layer = nn.Linear(3, 2)
    x = [torch.randn(50, 3)]
    with torch.no_grad():
        y = [layer(x[0])]
    before = copy.deepcopy(layer.state_dict())
    err0, err1 = refit(layer, x, y)  # already the least-squares answer: nothing to gain
    assert err0 == pytest.approx(0.0, abs=1e-6) and err1 == err0
    assert all(torch.equal(before[k], layer.state_dict()[k]) for k in before)
    y2 = [y[0] + 0.5]  # a constant shift: only the bias moves, to the shift
    err0, err1 = refit(layer, x, y2)
    assert err1 < 1e-3 < err0
    assert torch.allclose(layer.bias.detach(), before["bias"] + 0.5, atol=1e-3)


def test_bert_heads_and_ffn_neurons_refit_closer_to_the_teacher():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=200,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    bert = transformers.BertModel(cfg).eval()

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, ids):
            return self.bert(input_ids=ids).last_hidden_state

    ids = torch.randint(0, 200, (96, 16))
    task = Task(
        name="bert_tiny",
        model=Encoder().eval(),
        train=DataLoader(TensorDataset(ids, torch.zeros(96)), batch_size=16),
        test=DataLoader(TensorDataset(ids, torch.zeros(96)), batch_size=16),
        metric="fidelity",
        loss="cosine",
        targets=None,
        inputs=lambda b: (b[0],),
    )
    teacher = task.teacher()
    layers = {}
    for i in range(2):
        p = f"bert.encoder.layer.{i}."
        layers[p + "attention.output.dense"] = LayerPlan(bits=32, heads_kept=0.5)
        layers[p + "intermediate.dense"] = LayerPlan(bits=32, sparsity=0.5, sparsity_kind="structured")
    plain = compress(task, teacher, Plan(layers=layers, epochs=0)).model
    fixed = compress(task, teacher, Plan(layers=layers, epochs=0, reconstruct=True))
    names = narrowed_linears(teacher, fixed.model)
    assert names == [
        f"bert.encoder.layer.{i}.{n}" for i in range(2) for n in ("attention.output.dense", "output.dense")
    ]
    with torch.no_grad():
        ref = teacher(ids)
        gap = lambda m: 1.0 - float(nn.functional.cosine_similarity(m(ids), ref, dim=-1).mean())  # noqa: E731
        assert gap(plain) > 5e-5, gap(plain)  # half the heads and neurons gone: the embeddings move
        assert gap(fixed.model) < 0.5 * gap(plain), (gap(fixed.model), gap(plain))  # refit: closer
    assert all(fixed.notes[n].count("reconstructed") == 1 for n in names)


def test_plan_and_space_field():
    p = Plan(reconstruct=True)
    assert Plan.from_dict(p.to_dict()).reconstruct is True
    assert Plan.from_dict({k: v for k, v in p.to_dict().items() if k != "reconstruct"}).reconstruct is False
    with pytest.raises(ConfigError, match="reconstruct 'yes' is not one of"):
        Plan(reconstruct="yes")
