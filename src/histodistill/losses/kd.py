"""Hinton's knowledge distillation: match the teacher's temperature-softened class distribution."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0
) -> torch.Tensor:
    """``T² · KL(softmax(z_t / T) ‖ softmax(z_s / T))``, averaged over the batch.

    student_logits, teacher_logits: (B, C). The T² factor keeps the gradient scale of this term
    comparable to the cross-entropy as T changes (Hinton et al. 2015). The teacher side is detached:
    the teacher is never trained through this term.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"KD needs student and teacher logits of the same shape, got {tuple(student_logits.shape)} "
            f"and {tuple(teacher_logits.shape)}"
        )
    log_p_student = F.log_softmax(student_logits / temperature, dim=1)
    p_teacher = F.softmax(teacher_logits.detach() / temperature, dim=1)
    return F.kl_div(log_p_student, p_teacher, reduction="batchmean") * temperature**2
