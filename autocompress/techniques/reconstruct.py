"""Least-squares reconstruction after one-shot structured pruning (the plan's ``reconstruct``).

Removing FFN neurons or attention heads narrows the *inputs* of the layer that reads them (a BERT FFN's
``output.dense``, an attention's output projection). The kept inputs still carry much of what the removed
ones did (e.g. the pre-activations of an FFN's neurons are linear maps of the same hidden vector), so
the reading layer's weights can be refit to make up for them: on calibration samples of the training
split, every ``nn.Linear`` whose input width went down gets the weight and bias that map the pruned
model's inputs of that layer closest, in least squares (ridge), to the teacher's outputs of the same
layer. Layers are refit one after the other in forward order, each on the inputs the earlier refits
produce, so errors do not pile up. This is post-training: no gradient step, a few forward passes.

Runs as a pipeline step after structured one-shot pruning (order 15) and before low rank, masks and
quantization; with an iterative (gradual) schedule the channels go during fine-tuning and nothing is
refit. Layers other than ``nn.Linear`` (convolutions) are not refit.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..registry import TECHNIQUES, Dim, TechniqueSpec
from ..tasks.data import deployable
from ._build import Build

SAMPLES = 192  # training samples the refit sees (a BERT at sequence 128: 24,576 token rows)
CHUNK = 4096  # rows per block of the Gram sums
RIDGE = 1e-4  # ridge term, relative to the mean diagonal of the inputs' Gram matrix


class _Stop(Exception):
    """Raised by a forward hook once the layer being refit has seen its input (the rest is not needed)."""


def narrowed_linears(teacher: nn.Module, student: nn.Module) -> list[str]:
    """Names of the student's ``nn.Linear`` layers that read fewer inputs than the teacher's same layer,
    in forward (definition) order."""
    tm = dict(teacher.named_modules())
    return [
        n
        for n, m in student.named_modules()
        if isinstance(m, nn.Linear)
        and isinstance(tm.get(n), nn.Linear)
        and m.in_features < tm[n].in_features
        and m.out_features == tm[n].out_features
    ]


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1, t.shape[-1]).float()


def _chunks(xs: list[torch.Tensor], ys: list[torch.Tensor], bias: bool):
    """(inputs with a column of ones when the layer has a bias, targets) in blocks of at most CHUNK rows."""
    for x, y in zip(xs, ys, strict=True):
        for i in range(0, len(x), CHUNK):
            xc = x[i : i + CHUNK]
            yield (torch.cat([xc, torch.ones(len(xc), 1)], 1) if bias else xc), y[i : i + CHUNK].float()


def _teacher_outputs(model: nn.Module, names: list[str], batches) -> dict[str, list[torch.Tensor]]:
    out: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hooks = [  # float32: a BERT's 12 narrowed layers over 192 samples, 450 MB
        model.get_submodule(n).register_forward_hook(lambda _m, _i, o, n=n: out[n].append(_rows(o)))
        for n in names
    ]
    try:
        with torch.no_grad():
            for inputs in batches:
                model(*inputs)
    finally:
        for h in hooks:
            h.remove()
    return out


def _student_inputs(model: nn.Module, name: str, batches) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []

    def keep(_m, args):
        seen.append(_rows(args[0]))
        raise _Stop

    hook = model.get_submodule(name).register_forward_pre_hook(keep)
    try:
        with torch.no_grad():
            for inputs in batches:
                with contextlib.suppress(_Stop):
                    model(*inputs)
    finally:
        hook.remove()
    return seen


def refit(layer: nn.Linear, inputs: list[torch.Tensor], targets: list[torch.Tensor]) -> tuple[float, float]:
    """Set ``layer``'s weight (and bias) to the ridge least-squares map from ``inputs`` to ``targets``
    (row blocks of the same lengths). Returns the relative output error before and after; the layer is
    left as it was when the fit is no better.

    The Gram matrix is summed in float64 from float32 blocks (float32 products: a BERT FFN's 1,536 inputs
    over 24,576 rows in about a second) and solved in float64."""
    d = layer.in_features
    bias = layer.bias is not None
    gram = torch.zeros(d + bias, d + bias, dtype=torch.float64)
    cross = torch.zeros(d + bias, layer.out_features, dtype=torch.float64)
    w0 = layer.weight.detach().float().T
    if bias:
        w0 = torch.cat([w0, layer.bias.detach().float()[None]], 0)  # (d + 1, out): the ones column's row
    err0 = norm = 0.0
    for xa, y in _chunks(inputs, targets, bias):
        gram += (xa.T @ xa).double()
        cross += (xa.T @ y).double()
        err0 += float(((xa @ w0 - y) ** 2).sum())
        norm += float((y**2).sum())
    ridge = RIDGE * float(gram.diagonal().mean()) + 1e-12
    sol = torch.linalg.solve(gram + ridge * torch.eye(len(gram), dtype=gram.dtype), cross).float()
    err1 = sum(float(((xa @ sol - y) ** 2).sum()) for xa, y in _chunks(inputs, targets, bias))
    norm = max(norm, 1e-30)
    if err1 >= 0.999 * err0:  # never worse than the pruned layer as it is (nor changed for nothing)
        return (err0 / norm) ** 0.5, (err0 / norm) ** 0.5
    with torch.no_grad():
        layer.weight.copy_(sol[:d].T.to(layer.weight.dtype))
        if bias:
            layer.bias.copy_(sol[d].to(layer.bias.dtype))
    return (err0 / norm) ** 0.5, (err1 / norm) ** 0.5


def _refit_in_one_pass(student: nn.Module, names: list[str], inputs, targets, refits: dict) -> None:
    """One forward of the whole calibration batch through the student: each layer to refit is refit in
    its forward pre-hook, from the inputs it is about to read, so the layers after it see the refit."""

    def hook(m, args, name):
        refits[name] = refit(m, [_rows(args[0])], targets.pop(name))

    hooks = [
        student.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: hook(m, a, n)) for n in names
    ]
    try:
        with torch.no_grad():
            student(*inputs)
    finally:
        for h in hooks:
            h.remove()


def reconstruct_step(build: Build) -> None:
    """Refit the layers whose inputs structured pruning narrowed (plan ``reconstruct``, one shot only)."""
    if not build.plan.reconstruct or build.iterative:
        return
    names = narrowed_linears(build.teacher, build.student)
    if not names:
        return
    io = build.task.io
    student = deployable(build.student, io)
    was_training = build.student.training
    build.student.eval()
    refits: dict[str, tuple[float, float]] = {}
    try:
        try:  # the calibration samples as one batch: one pass through teacher and student
            inputs, _ = build.task.train_split.first(SAMPLES)
            batches = [inputs]
        except RuntimeError:  # batches that do not concatenate (e.g. other sequence lengths)
            batches = [inputs for inputs, _ in build.task.train_split.batches(limit=SAMPLES)]
        targets = _teacher_outputs(deployable(build.teacher, io), names, batches)
        if len(batches) == 1:
            _refit_in_one_pass(student, names, batches[0], targets, refits)
        else:  # one pass per layer, in forward order
            for name in names:
                refits[name] = refit(
                    build.student.get_submodule(name),
                    _student_inputs(student, name, batches),
                    targets.pop(name),
                )
    finally:
        build.student.train(was_training)
    for name in names:
        if name in refits:
            before, after = refits[name]
            build.note(name, f"reconstructed: output error {before:.3f} -> {after:.3f} (least squares)")


SPEC = TechniqueSpec(
    "reconstruct",
    settings=(Dim("reconstruct", False, cast=bool, choices=(False, True)),),
    steps=((15, reconstruct_step),),
)
TECHNIQUES.add(SPEC.name, SPEC)
