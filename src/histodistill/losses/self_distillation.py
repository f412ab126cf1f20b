"""SD-MAE's self-distillation: the encoder's view of the visible patches (student) learns to match
the decoder's view of the same patches (teacher), DINO-style, with a centred, sharpened teacher.

``L = mean_b Σ_k −P_bk · log q_bk`` with ``q = softmax(s / τ_s)`` and ``P = softmax((t − c) / τ_t)``;
after each call the centre follows ``c ← m·c + (1 − m)·mean_b P_b`` (SD-MAE centres the teacher's
probabilities, not its logits as DINO does). The batch mean is all-reduced across processes when
torch.distributed is initialised, so every replica keeps the same centre; on one device it is local.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class SelfDistillationLoss(nn.Module):
    """forward(student (B, K), teacher (B, K)) -> scalar loss; updates the centre (1, K) buffer.

    ``stop_grad_teacher`` detaches the teacher logits. SD-MAE's official code does not (the decoder
    and the teacher head are trained through this term too), hence the default False.
    """

    def __init__(
        self,
        out_dim: int,
        student_temp: float = 0.1,
        teacher_temp: float = 0.04,
        center_momentum: float = 0.9,
        stop_grad_teacher: bool = False,
    ) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.teacher_temp = teacher_temp
        self.center_momentum = center_momentum
        self.stop_grad_teacher = stop_grad_teacher
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        if self.stop_grad_teacher:
            teacher = teacher.detach()
        log_q = F.log_softmax(student.float() / self.student_temp, dim=-1)  # (B, K)
        p = F.softmax((teacher.float() - self.center) / self.teacher_temp, dim=-1)  # (B, K)
        loss = (-p * log_q).sum(dim=-1).mean()
        if self.training:
            self.update_center(p)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_probs: torch.Tensor) -> None:
        """``c ← m·c + (1 − m)·mean over the (global) batch of the teacher probabilities`` (B, K)."""
        total = teacher_probs.detach().sum(dim=0, keepdim=True)  # (1, K)
        count = torch.tensor(float(teacher_probs.shape[0]), device=total.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(total)
            dist.all_reduce(count)
        self.center.mul_(self.center_momentum).add_(total / count, alpha=1 - self.center_momentum)
