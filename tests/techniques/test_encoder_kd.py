"""Encoder distillation (kd_features): hidden-state MSE and attention-distribution KL between a teacher
and a student encoder, collected by forward hooks (torch's TransformerEncoder, HeadAttention, BERT)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from autocompress.errors import ConfigError
from autocompress.pipeline import compress
from autocompress.plan import Plan
from autocompress.search.applicability import Applicability
from autocompress.search.narrowing import MODEL, check_settings
from autocompress.space import SearchSpace
from autocompress.tasks import Task
from autocompress.techniques import (
    EncoderDistill,
    attention_log_probs,
    drop_blocks,
    encoder_points,
    prune_heads,
)
from autocompress.techniques.encoder_kd import inapplicable, offered
from autocompress.testing.models import BertClassifier, PlainCNN, TinyTransformer, TorchTransformer


def _torch_encoder():
    torch.manual_seed(0)
    return TorchTransformer(dim=32, depth=2, heads=4).eval(), torch.randn(4, 40)


def _bert():
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    return BertClassifier().eval(), torch.randint(0, 64, (4, 12))


MODELS = {"torch": _torch_encoder, "bert": _bert}


def _features(teacher, student, x, kinds="hidden+attention"):
    d = EncoderDistill(teacher, student, kinds)
    try:
        with torch.no_grad():
            teacher(x)  # eval + no_grad: the encoder layer's fused path, unless distillation turned it off
        student(x)
        return d.hidden_loss(), d.attention_loss()
    finally:
        d.close()


@pytest.mark.parametrize("name", MODELS)
def test_feature_losses_are_zero_between_identical_models(name):
    teacher, x = MODELS[name]()
    hidden, attention = _features(teacher, copy.deepcopy(teacher), x)
    assert abs(hidden.item()) < 1e-6 and abs(attention.item()) < 1e-6


@pytest.mark.parametrize("name", MODELS)
def test_feature_losses_are_positive_when_models_differ_and_reach_the_student(name):
    teacher, x = MODELS[name]()
    student = copy.deepcopy(teacher)
    blocks, attentions = encoder_points(student)
    assert len(blocks) == len(attentions) == 2
    first = student.get_submodule(attentions[0])
    proj = first.in_proj_weight if hasattr(first, "in_proj_weight") else first.query.weight
    with torch.no_grad():  # the first block's weights move by half their spread
        for p in student.get_submodule(blocks[0]).parameters():
            p.add_(0.5 * p.std() * torch.randn_like(p))
    hidden, attention = _features(teacher, student, x)
    assert hidden.item() > 1e-6 and attention.item() > 1e-6, (hidden, attention)  # identical: exactly 0
    (hidden + attention).backward()
    assert proj.grad is not None and proj.grad.abs().sum() > 0  # the attention term reaches q/k
    assert all(p.grad is None for p in teacher.parameters())


def test_recomputed_attention_is_the_modules_own_with_padding():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    x = torch.randn(2, 5, 16)
    pad = torch.tensor([[False] * 5, [False, False, False, True, True]])
    _, weights = mha(x, x, x, key_padding_mask=pad, need_weights=True, average_attn_weights=False)
    probs = attention_log_probs(mha, (x, x, x), {"key_padding_mask": pad}).exp()
    assert torch.allclose(probs, weights, atol=1e-6)
    assert probs[1, :, :, 3:].max() < 1e-30  # padded keys get no attention


def test_kept_heads_are_matched_to_the_teacher_heads_they_came_from():
    teacher, x = _torch_encoder()
    student = copy.deepcopy(teacher)
    prune_heads(student, "encoder.layers.0.self_attn.out_proj", 2)  # a HeadAttention with 2 of 4 heads
    d = EncoderDistill(teacher, student, "hidden+attention")
    with torch.no_grad():
        teacher(x)
        student(x)
        per_layer = [d.attention_loss_of(n) for n in d.attentions]
        hidden = d.hidden_loss()
    d.close()
    # layer 0's kept heads see the teacher's inputs with the teacher's q/k rows: the same distributions;
    # layer 1 reads what the pruned layer 0 wrote: it differs, as does every block's output
    assert abs(per_layer[0].item()) < 1e-6 and per_layer[1].item() > 1e-6 and hidden.item() > 1e-6


def test_dropped_layers_distil_from_the_teacher_layer_they_came_from():
    teacher, x = _torch_encoder()
    student = copy.deepcopy(teacher)
    drop_blocks(student, {"encoder.layers": {"0"}})
    d = EncoderDistill(teacher, student, "hidden")
    assert d.blocks == ["encoder.layers.1"] and d.attentions == []
    d.close()


def test_offered_only_where_there_are_encoder_layers():
    teacher, _ = _torch_encoder()
    assert offered(teacher) == ("none", "hidden", "attention", "hidden+attention")
    assert offered(PlainCNN()) == ("none",)
    # attention of plain q/k/v Linears in a layer list: its blocks' hidden states, not its attention maps
    assert offered(TinyTransformer()) == ("none", "hidden")
    with pytest.raises(Exception, match="no transformer encoder layers"):
        EncoderDistill(PlainCNN(), PlainCNN(), "hidden")


def test_applicability_removes_feature_kd_from_a_model_without_encoder_layers():
    space = SearchSpace.from_dict({"kd": {"features": {"choices": ["none", "hidden", "hidden+attention"]}}})
    result = Applicability()
    check_settings(PlainCNN(), space, result)
    assert result.domains == {"kd.features": {"fixed": "none"}}
    (check,) = result.checks
    assert (check.layer, check.status, check.removed) == (MODEL, "no effect", "kd.features -> fixed none")
    space.narrow(result.domains)
    assert space.plan_param("kd.features").fixed == "none"
    encoder = Applicability()
    check_settings(_torch_encoder()[0], SearchSpace.from_dict(space.model.model_dump()), encoder)
    assert encoder.domains == {} and encoder.checks == []
    with pytest.raises(ConfigError, match="kd.features"):
        SearchSpace.from_dict({"kd": {"features": {"choices": ["none", "logits"]}}})


def test_the_fine_tune_uses_the_feature_loss_and_leaves_no_hook():
    teacher, _ = _torch_encoder()
    x = torch.randn(64, 40)
    y = teacher(x).argmax(1).detach()
    task = Task(name="enc", model=teacher, train=(x, y), eval=(x[:16], y[:16]), batch_size=16)
    plan = Plan(kd_features="hidden+attention", kd_feature_weight=1.0, steps=4)
    seen = []

    def stop(epoch, loss, model):
        seen.append(loss)
        raise RuntimeError("stopped")  # a trial pruned or timed out mid-way: the hooks must come off anyway

    with pytest.raises(RuntimeError, match="stopped"):
        compress(task, teacher, plan, on_epoch=stop)
    hooks = lambda m: sum(len(s._forward_hooks) for s in m.modules())  # noqa: E731
    assert seen and hooks(teacher) == 0 and torch.backends.mha.get_fastpath_enabled()
    with_features = compress(task, teacher, plan).losses
    without = compress(task, teacher, Plan(steps=4)).losses
    assert hooks(teacher) == 0 and torch.backends.mha.get_fastpath_enabled()
    assert with_features != without  # the same seed and batches: the feature terms changed the fine-tune


def test_mpnet_blocks_distil_hidden_states_but_not_attention_maps():
    """MPNet's self-attention (q/k/v Linears, a relative position bias) is not recomputed: its blocks'
    hidden states are distilled, and the applicability check says why attention is not offered."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.MPNetConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    teacher = transformers.MPNetModel(cfg).eval()
    x = torch.randint(3, 64, (2, 10))
    assert offered(teacher) == ("none", "hidden")
    assert encoder_points(teacher) == (["encoder.layer.0", "encoder.layer.1"], [])
    (gone, why), = inapplicable(teacher).values()
    assert gone == ("attention", "hidden+attention") and "not recomputed" in why
    student = copy.deepcopy(teacher)
    d = EncoderDistill(teacher, student, "hidden")
    try:
        with torch.no_grad():
            teacher(x)
        student(x)
        assert abs(d.hidden_loss().item()) < 1e-10  # identical
        with torch.no_grad():
            for p in student.encoder.layer[0].parameters():
                p.add_(0.5 * p.std() * torch.randn_like(p))
        with torch.no_grad():
            teacher(x)
        student(x)
        loss = d.hidden_loss()
        assert loss.item() > 1e-6  # identical: below 1e-10
        loss.backward()
        q = student.encoder.layer[0].attention.attn.q.weight
        assert q.grad is not None and q.grad.abs().sum() > 0
    finally:
        d.close()
