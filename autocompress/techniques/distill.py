"""Knowledge distillation: logit KD (Hinton et al., 2015) and feature KD on hint layers (FitNets)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import TechniqueError
from ..registry import TECHNIQUES, TechniqueSpec
from ..tasks.data import deployable


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    """``alpha * T^2 * KL(p_teacher^T || p_student^T) + (1 - alpha) * CE(student, labels)``.

    The ``T^2`` factor keeps the soft term's gradient magnitude independent of ``T``.
    """
    if temperature <= 0:
        raise TechniqueError(f"KD temperature {temperature} must be > 0")
    if not (0.0 <= alpha <= 1.0):
        raise TechniqueError(f"KD alpha {alpha} is outside [0, 1]")
    hard = F.cross_entropy(student_logits, labels)
    if alpha == 0.0:
        return hard
    t = temperature
    soft = F.kl_div(
        F.log_softmax(student_logits / t, dim=1),
        F.log_softmax(teacher_logits.detach() / t, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    return alpha * (t * t) * soft + (1.0 - alpha) * hard


def distill_loss(
    kind,
    student_out: torch.Tensor,
    teacher_out: torch.Tensor,
    targets: torch.Tensor | None,
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    """The fine-tuning loss of one batch.

    ``kind``: ``ce_kd`` (:func:`kd_loss`; soft KD alone when the batch has no targets), ``mse`` or
    ``cosine`` (to the teacher's outputs: embeddings, regression), or a callable
    ``fn(student_out, teacher_out, targets) -> loss``.
    """
    teacher_out = teacher_out.detach()
    if callable(kind):
        return kind(student_out, teacher_out, targets)
    if kind == "ce_kd":
        if targets is None:
            return kd_loss(student_out, teacher_out, teacher_out.argmax(dim=1), temperature, 1.0)
        return kd_loss(student_out, teacher_out, targets, temperature, alpha)
    if kind == "mse":
        return F.mse_loss(student_out.float(), teacher_out.float())
    if kind == "cosine":
        s, t = student_out.flatten(1).float(), teacher_out.flatten(1).float()
        return (1.0 - F.cosine_similarity(s, t, dim=1)).mean()
    raise TechniqueError(f"unknown fine-tuning loss {kind!r} (ce_kd, mse, cosine or a callable)")


class FeatureHints:
    """Feature distillation on hint layers (FitNets-style): MSE between the student's and the
    teacher's outputs of the same-named modules.

    Where the widths differ (e.g. after structured pruning), a trainable adapter maps the student's
    features to the teacher's width: a 1x1 conv for conv features, a Linear otherwise. Adapters are
    built on the first batch and their parameters must join the optimizer (:meth:`parameters`).
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, layers: list[str]):
        names = dict(student.named_modules())
        missing = [n for n in layers if n not in names or n not in dict(teacher.named_modules())]
        if missing:
            raise TechniqueError(f"hint layers not found in the model: {', '.join(missing)}")
        self.layers = list(layers)
        self.adapters = nn.ModuleDict()
        self._t: dict[str, torch.Tensor] = {}
        self._s: dict[str, torch.Tensor] = {}
        self._hooks = [
            *(teacher.get_submodule(n).register_forward_hook(self._keep(self._t, n)) for n in layers),
            *(student.get_submodule(n).register_forward_hook(self._keep(self._s, n)) for n in layers),
        ]

    @staticmethod
    def _keep(store: dict, name: str):
        def hook(_module, _inputs, output):
            store[name] = output

        return hook

    def _adapter(self, name: str, s: torch.Tensor, t: torch.Tensor) -> nn.Module:
        key = name.replace(".", "__")
        if key not in self.adapters:
            if s.shape[1] == t.shape[1] and s.dim() == t.dim():
                self.adapters[key] = nn.Identity()
            elif s.dim() == 4:
                self.adapters[key] = nn.Conv2d(s.shape[1], t.shape[1], 1)
            elif s.dim() == 3 and s.shape[-1] != t.shape[-1]:  # tokens: [batch, time, features]
                self.adapters[key] = nn.Linear(s.shape[-1], t.shape[-1])
            else:
                self.adapters[key] = nn.Linear(s.shape[1], t.shape[1])
        return self.adapters[key]

    def loss(self) -> torch.Tensor:
        """Mean over hint layers of the MSE between adapted student and (detached) teacher features."""
        terms = []
        for name in self.layers:
            s, t = self._s[name], self._t[name].detach()
            s = self._adapter(name, s, t)(s)
            if s.shape != t.shape:
                raise TechniqueError(
                    f"hint layer {name!r}: student {tuple(s.shape)} vs teacher {tuple(t.shape)}"
                )
            terms.append(F.mse_loss(s, t))
        return torch.stack(terms).mean()

    def parameters(self):
        return self.adapters.parameters()

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


# -- the technique: feature hints in the fine-tune (pipeline order 50) ------------------------------
def hint_step(build) -> None:
    """Feature KD on the plan's hint layers: a loss term, the adapters' parameters, their rebuild when
    layers get smaller, and the hooks' removal after the fine-tune."""
    plan = build.plan
    if not (plan.hints and plan.hint_weight > 0):
        return
    hints = FeatureHints(build.teacher, build.student, list(plan.hints))
    ts, ds = deployable(build.teacher, build.task.io), deployable(build.student, build.task.io)
    probe = build.task.example_inputs(2)

    def build_adapters() -> None:  # on one batch, so that the optimizer sees them
        with torch.no_grad():
            ts(*probe)
            ds(*probe)
            hints.loss()

    def rebuild() -> None:  # widths changed: adapters are rebuilt
        hints.adapters.clear()
        build_adapters()

    if build.total:
        build_adapters()
    build.loss_terms.append(lambda: plan.hint_weight * hints.loss())
    build.parameters.append(lambda: list(hints.parameters()))
    build.changed.append(rebuild)
    build.trained.append(hints.close)
    build.cleanup.append(hints.close)  # also when the fine-tune fails: the teacher is shared by trials


SPEC = TechniqueSpec("distill", steps=((50, hint_step),))
TECHNIQUES.add(SPEC.name, SPEC)
