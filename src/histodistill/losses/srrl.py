"""Softmax regression representation learning, SRRL (Yang et al., ICLR 2021): regress the teacher's
pooled feature, and make the teacher's own classifier, applied to the regressed student feature, predict
what it predicts on the teacher's feature."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SRRLLoss(nn.Module):
    """``MSE(r(f_s), f_t) + MSE(W_t · r(f_s), z_t)``, with ``r`` = Linear + BatchNorm + ReLU (the official
    1×1 convolution on the pooled feature) and ``W_t`` the frozen teacher classifier.

    forward(student (B, Ds), teacher (B, Dt), teacher_classifier, teacher_logits (B, K)) -> scalar.
    """

    def __init__(self, student_dim: int, teacher_dim: int) -> None:
        super().__init__()
        self.transfer = nn.Sequential(
            nn.Linear(student_dim, teacher_dim, bias=False), nn.BatchNorm1d(teacher_dim), nn.ReLU()
        )

    def forward(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        teacher_classifier: nn.Module,
        teacher_logits: torch.Tensor,
    ) -> torch.Tensor:
        regressed = self.transfer(student)
        return F.mse_loss(regressed, teacher.detach()) + F.mse_loss(
            teacher_classifier(regressed), teacher_logits.detach()
        )
