"""Knowledge distillation: logit KD (Hinton et al., 2015)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import TechniqueError


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
