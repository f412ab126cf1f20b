"""FitNet hint (Romero et al. 2015) on the pooled feature: regress the teacher's feature from the student's."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class HintLoss(nn.Module):
    """``MSE(W · f_s, f_t)`` with a trainable linear regressor ``W`` (student dim -> teacher dim).

    The hint sits on the pooled feature (as in the MoMA comparison), so the regressor is a Linear
    rather than FitNet's convolution; it makes different widths comparable.
    """

    def __init__(self, student_dim: int, teacher_dim: int) -> None:
        super().__init__()
        self.regressor = nn.Linear(student_dim, teacher_dim)

    def forward(self, student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
        """student_features (B, Ds), teacher_features (B, Dt) -> scalar mean squared error."""
        return F.mse_loss(self.regressor(student_features), teacher_features.detach())
