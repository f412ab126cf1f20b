"""FitNet hint (Romero et al. 2015) on the pooled feature: regress the teacher's feature from the
student's."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class HintLoss(nn.Module):
    """``MSE(relu(BN(conv₁ₓ₁(f_s))), f_t)`` with a trainable regressor (student dim -> teacher dim).

    MoMA's comparison hints at ``feat[hint_layer=5]``, the pooled feature as a (B, C, 1, 1) map, through
    RepDistiller's ``ConvReg``: for equal 1×1 maps a 1×1 convolution (with bias), BatchNorm2d and ReLU
    (trinhvg/MoMA ``models/util.py``). The regressor is that, on the pooled feature laid out as a 1×1 map.
    """

    def __init__(self, student_dim: int, teacher_dim: int) -> None:
        super().__init__()
        self.regressor = nn.Sequential(
            nn.Conv2d(student_dim, teacher_dim, 1), nn.BatchNorm2d(teacher_dim), nn.ReLU()
        )

    def forward(self, student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
        """student_features (B, Ds), teacher_features (B, Dt) -> scalar mean squared error."""
        regressed = self.regressor(student_features[:, :, None, None]).flatten(1)  # (B, Ds, 1, 1) -> (B, Dt)
        return F.mse_loss(regressed, teacher_features.detach())
