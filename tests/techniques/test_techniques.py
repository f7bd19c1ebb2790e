from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autocompress.errors import TechniqueError
from autocompress.tasks.digits import DigitsCNN
from autocompress.techniques import (
    add_fake_quant,
    apply_masks,
    factorize,
    fake_quant,
    fold_batchnorm,
    kd_loss,
    magnitude_mask,
    qmax_for,
    quantize_weight,
    set_sparsity,
    sparsity_at,
)


# -- quantization ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("bits", "reduce", "expected"), [(8, False, 127), (8, True, 63), (4, False, 7), (4, True, 7)]
)
def test_qmax(bits, reduce, expected):
    assert qmax_for(bits, reduce) == expected


def test_qmax_rejects_impossible_bits():
    with pytest.raises(TechniqueError, match="cannot quantize to 1 bits"):
        qmax_for(1)


@pytest.mark.parametrize("bits", [4, 8])
def test_fake_quant_is_on_a_per_channel_symmetric_grid(bits):
    torch.manual_seed(0)
    w = torch.randn(16, 8, 3, 3)
    qmax = qmax_for(bits)
    wq = fake_quant(w, qmax)
    scale = w.abs().reshape(16, -1).amax(1) / qmax
    ints = wq.reshape(16, -1) / scale[:, None]
    assert torch.allclose(ints, ints.round(), atol=1e-4)
    assert ints.abs().max() <= qmax + 1e-4
    # the channel max maps exactly to qmax; the error is at most half a step
    assert torch.allclose(ints.abs().amax(1), torch.full((16,), float(qmax)), atol=1e-4)
    assert ((wq - w).reshape(16, -1).abs() <= scale[:, None] / 2 + 1e-6).all()
    q, s = quantize_weight(wq, qmax)  # re-quantizing a quantized weight gives the same integers
    assert torch.equal(q.reshape(16, -1), ints.round().to(torch.int32))
    assert torch.allclose(s, scale)


def test_fake_quant_straight_through_gradient():
    w = torch.randn(4, 5, requires_grad=True)
    g = torch.randn(4, 5)
    (fake_quant(w, 7) * g).sum().backward()
    assert torch.equal(w.grad, g)


@pytest.mark.parametrize(("bits", "min_snr_db"), [(16, 60), (8, 35), (6, 25), (4, 13), (3, 7)])
def test_fake_quant_output_snr_per_bit_width(bits, min_snr_db):
    torch.manual_seed(0)
    layer = nn.Linear(64, 32)
    x = torch.randn(256, 64)
    ref = layer(x)
    add_fake_quant(layer, bits)
    with torch.no_grad():
        err = layer(x) - ref
        snr_db = float(10 * torch.log10(ref.pow(2).mean() / err.pow(2).mean()))
    assert snr_db > min_snr_db
    # one more bit buys about 6 dB
    if bits in (3, 4, 6):
        finer = nn.Linear(64, 32)
        finer.load_state_dict(
            {
                k.replace("parametrizations.weight.original", "weight"): v
                for k, v in layer.state_dict().items()
            }
        )
        add_fake_quant(finer, bits + 1)
        with torch.no_grad():
            snr_finer = float(10 * torch.log10(ref.pow(2).mean() / (finer(x) - ref).pow(2).mean()))
        assert 4 < snr_finer - snr_db < 8


def test_int8_fake_quant_keeps_output_snr():
    torch.manual_seed(0)
    layer = nn.Linear(64, 32)
    x = torch.randn(256, 64)
    ref = layer(x)
    add_fake_quant(layer, 8)
    err = layer(x) - ref
    snr_db = 10 * torch.log10(ref.pow(2).mean() / err.pow(2).mean())
    assert snr_db > 35


# -- pruning ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.73, 0.9])
def test_magnitude_mask_exact_count_and_smallest_removed(sparsity):
    torch.manual_seed(1)
    w = torch.randn(37, 11)
    mask = magnitude_mask(w, sparsity)
    k = round(sparsity * w.numel())
    assert int((mask == 0).sum()) == k
    if 0 < k < w.numel():
        assert w[mask == 0].abs().max() <= w[mask == 1].abs().min()


def test_magnitude_mask_rejects_full_sparsity():
    with pytest.raises(TechniqueError, match=r"sparsity 1.0 is outside \[0, 1\)"):
        magnitude_mask(torch.randn(3, 3), 1.0)


def test_pruned_weights_stay_pruned_as_sparsity_grows():
    torch.manual_seed(0)
    layer = nn.Linear(20, 20)
    apply_masks({"l": layer})
    set_sparsity(layer, 0.3)
    first = layer.weight == 0
    with torch.no_grad():  # an optimizer moving a pruned weight must not resurrect it
        layer.parametrizations.weight.original.add_(10.0)
    set_sparsity(layer, 0.6)
    assert bool((layer.weight[first] == 0).all())
    assert int((layer.weight == 0).sum()) == round(0.6 * 400)


# -- schedules --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kind", "progress", "expected"),
    [
        ("one_shot", 0.0, 0.0),
        ("one_shot", 0.19, 0.0),
        ("one_shot", 0.2, 0.8),
        ("one_shot", 1.0, 0.8),
        ("linear", 0.1, 0.0),
        ("linear", 0.5, 0.4),
        ("linear", 0.8, 0.8),
        ("linear", 0.95, 0.8),
        ("cubic", 0.2, 0.0),
        ("cubic", 0.5, 0.8 * (1 - 0.5**3)),
        ("cubic", 0.8, 0.8),
        ("cubic", 1.0, 0.8),
    ],
)
def test_schedule_values(kind, progress, expected):
    assert sparsity_at(kind, 0.8, 0.2, 0.8, progress) == pytest.approx(expected, abs=1e-12)


def test_schedule_errors():
    with pytest.raises(TechniqueError, match="unknown schedule 'exp'"):
        sparsity_at("exp", 0.5, 0.0, 1.0, 0.5)
    with pytest.raises(TechniqueError, match="start <= end"):
        sparsity_at("linear", 0.5, 0.9, 0.1, 0.5)


# -- low rank ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("layer", "x"),
    [
        (nn.Linear(24, 16), torch.randn(8, 24)),
        (nn.Conv2d(6, 10, 3, padding=1, stride=2), torch.randn(2, 6, 9, 9)),
        (nn.Conv1d(4, 12, 5, padding=2, dilation=1), torch.randn(3, 4, 20)),
    ],
)
def test_full_rank_factorization_reproduces_outputs(layer, x):
    torch.manual_seed(0)
    full = min(layer.weight.shape[0], layer.weight[0].numel())
    fact = factorize(layer, full)
    assert torch.allclose(fact(x), layer(x), atol=1e-4)


def test_low_rank_factorization_has_fewer_params_and_bounded_error():
    torch.manual_seed(0)
    layer = nn.Linear(64, 64)
    fact = factorize(layer, 16)
    assert sum(p.numel() for p in fact.parameters()) < sum(p.numel() for p in layer.parameters())
    # Eckart-Young: the spectral-norm error of the weight equals the first dropped singular value
    s = torch.linalg.svdvals(layer.weight.detach())
    approx = fact[1].weight @ fact[0].weight
    err = torch.linalg.matrix_norm((layer.weight - approx).detach(), ord=2)
    assert float(err) == pytest.approx(float(s[16]), rel=1e-3)


def test_factorize_errors():
    with pytest.raises(TechniqueError, match="grouped/depthwise conv"):
        factorize(nn.Conv2d(8, 8, 3, groups=8), 2)
    with pytest.raises(TechniqueError, match=r"rank 0 is outside \[1, 10\]"):
        factorize(nn.Linear(10, 20), 0)


# -- distillation -----------------------------------------------------------------------------------
def test_kd_loss_formula():
    torch.manual_seed(0)
    s, t = torch.randn(16, 10), torch.randn(16, 10)
    y = torch.randint(0, 10, (16,))
    T, a = 4.0, 0.3
    p_t = F.softmax(t / T, 1)
    kl = (p_t * (p_t.log() - F.log_softmax(s / T, 1))).sum(1).mean()
    expected = a * T * T * kl + (1 - a) * F.cross_entropy(s, y)
    assert kd_loss(s, t, y, T, a) == pytest.approx(float(expected), rel=1e-5)
    assert kd_loss(s, t, y, T, 0.0) == pytest.approx(float(F.cross_entropy(s, y)), rel=1e-6)
    # identical logits: the soft term vanishes
    assert kd_loss(s, s, y, T, 1.0) == pytest.approx(0.0, abs=1e-6)


def test_kd_loss_errors():
    z = torch.zeros(2, 3)
    with pytest.raises(TechniqueError, match="alpha 1.5"):
        kd_loss(z, z, torch.zeros(2, dtype=torch.long), 2.0, 1.5)


# -- BatchNorm folding ------------------------------------------------------------------------------
def test_fold_batchnorm_preserves_outputs():
    torch.manual_seed(0)
    model = DigitsCNN(16)
    for m in model.modules():  # non-trivial running statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
    model.eval()
    x = torch.rand(8, 1, 8, 8)
    ref = model(x)
    folded, names = fold_batchnorm(model)
    assert names == ["features.0", "features.3", "features.6", "features.10"]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert torch.allclose(folded(x), ref, atol=1e-5)


def test_spatial_svd_full_rank_reproduces_conv():
    from autocompress.techniques import factorize_spatial

    torch.manual_seed(0)
    conv = nn.Conv2d(6, 10, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 1))
    x = torch.randn(2, 6, 11, 13)
    full = min(6 * 3, 10 * 5)
    fact = factorize_spatial(conv, full)
    assert fact[0].kernel_size == (3, 1) and fact[1].kernel_size == (1, 5)
    assert torch.allclose(fact(x), conv(x), atol=1e-4)


def test_tucker_full_ranks_reproduce_conv_and_low_ranks_shrink_it():
    from autocompress.techniques import factorize_tucker

    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 3, padding=1)
    x = torch.randn(2, 8, 9, 9)
    assert torch.allclose(factorize_tucker(conv, 8, 12)(x), conv(x), atol=1e-4)
    small = factorize_tucker(conv, 4, 6)
    assert [m.weight.shape for m in small] == [(4, 8, 1, 1), (6, 4, 3, 3), (12, 6, 1, 1)]
    with pytest.raises(TechniqueError, match=r"Tucker ranks \(9, 6\) are outside"):
        factorize_tucker(conv, 9, 6)


def test_rank_by_kept_energy():
    from autocompress.techniques import rank_for_energy

    w = torch.diag(torch.tensor([3.0, 2.0, 1.0, 0.5]))  # energies 9, 4, 1, 0.25 of 14.25
    assert rank_for_energy(w, 9 / 14.25) == 1
    assert rank_for_energy(w, 0.9) == 2  # 13/14.25 = 0.912
    assert rank_for_energy(w, 0.98) == 3  # 14/14.25 = 0.982
    assert rank_for_energy(w, 0.99) == 4
    assert rank_for_energy(w, 1.0) == 4


def test_factorization_is_skipped_with_the_reason():
    from autocompress.techniques import plan_factorization

    new, why = plan_factorization(nn.Conv2d(8, 8, 3, groups=8), "ratio", 0.5)
    assert new is None and "depthwise/grouped conv (groups=8)" in why
    new, why = plan_factorization(nn.Linear(4, 4), "ratio", 0.75)  # rank 3: 3*(4+4) >= 16
    assert new is None and "factorized MACs 24 >= original 16" in why
    new, why = plan_factorization(nn.Linear(16, 4), "tucker", 0.5)
    assert new is None and "tucker needs a Conv2d" in why
    new, why = plan_factorization(nn.Conv2d(32, 32, 3), "tucker", 0.25)
    assert new is not None and why == "tucker ranks (8, 8) of (32, 32)"
    with pytest.raises(TechniqueError, match="unknown rank mode 'tensor_train'"):
        plan_factorization(nn.Linear(4, 4), "tensor_train", 0.5)


def test_feature_hints_adapt_pruned_widths_and_train():
    from autocompress.techniques import FeatureHints, prune_channels
    from autocompress.testing import PlainCNN

    torch.manual_seed(0)
    teacher = PlainCNN(16).eval()
    student = PlainCNN(16)
    student.load_state_dict(teacher.state_dict())
    x = PlainCNN.example_inputs(8)
    prune_channels(student, x, {"features.0": 0.5})  # 16 -> 8 channels: widths now differ
    hints = FeatureHints(teacher, student, ["features.0"])
    teacher(*x)
    student(*x)
    first = hints.loss()
    adapter = hints.adapters["features__0"]
    assert isinstance(adapter, nn.Conv2d) and (adapter.in_channels, adapter.out_channels) == (8, 16)
    opt = torch.optim.Adam(list(student.parameters()) + list(hints.parameters()), lr=1e-2)
    for _ in range(30):
        teacher(*x)
        student(*x)
        loss = hints.loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first.item()
    hints.close()
    with pytest.raises(TechniqueError, match="hint layers not found in the model: nope"):
        FeatureHints(teacher, student, ["nope"])


def test_compress_with_feature_kd(digits_task, digits_teacher):
    """Hint layers pull the student's features towards the teacher's during fine-tuning."""
    from autocompress.pipeline import compress
    from autocompress.plan import LayerPlan, Plan

    def hint_distance(model: nn.Module) -> float:  # MSE to the teacher's output of features.10
        seen = {}
        hooks = [
            m.features[10].register_forward_hook(lambda _m, _i, o, key=key: seen.update({key: o.detach()}))
            for key, m in (("s", model), ("t", digits_teacher))
        ]
        x = digits_task.test[0]
        model(x)
        digits_teacher(x)
        for h in hooks:
            h.remove()
        return float(F.mse_loss(seen["s"], seen["t"]))

    runs = {}
    for weight in (0.0, 1.0):  # the same plan and seed, without and with feature KD
        plan = Plan(
            layers={"features.6": LayerPlan(sparsity=0.5, sparsity_kind="structured")},
            hints=("features.6", "features.10"),
            hint_weight=weight,
            epochs=1,
        )
        runs[weight] = compress(digits_task, digits_teacher, plan)
    out = runs[1.0]
    assert out.model.features[6].out_channels == 8
    assert len(out.losses) == 1 and math.isfinite(out.losses[0])
    assert not out.model.features[6]._forward_hooks  # hooks removed after fine-tuning
    # the hint term is part of the loss that was minimized ...
    assert out.losses[0] > runs[0.0].losses[0] + 0.1, (out.losses, runs[0.0].losses)
    # ... and it did its job: features.10 ends much closer to the teacher's (measured: 0.38 vs 1.25)
    with_kd, without = hint_distance(out.model), hint_distance(runs[0.0].model)
    assert with_kd < 0.6 * without, (with_kd, without)
