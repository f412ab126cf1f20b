"""Variational information distillation, VID (Ahn et al., CVPR 2019): maximise a Gaussian lower bound on
the mutual information between a teacher layer and a student layer."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from histodistill.losses.spatial import match_spatial

EPS = 1e-5


class VIDLoss(nn.Module):
    """``−log q(t | s)`` for a Gaussian q with mean ``μ(s)`` (three 1×1 convolutions, student channels ->
    ``mid`` -> ``mid`` -> teacher channels, ReLU between) and one learned variance per teacher channel,
    ``σ²_c = softplus(α_c) + ε``:

        L = mean_{b,c,h,w} ½ (log σ²_c + (t − μ(s))² / σ²_c)        (the constant ½ log 2π dropped)

    ``init_variance`` is the variance the α start at (the official code's 5.0): VID's initialisation.
    Spatial sizes are matched by `match_spatial`.
    """

    def __init__(
        self,
        student_channels: int,
        teacher_channels: int,
        mid_channels: int | None = None,
        init_variance: float = 5.0,
    ) -> None:
        super().__init__()
        mid = mid_channels or teacher_channels
        self.regressor = nn.Sequential(
            nn.Conv2d(student_channels, mid, 1, bias=False),
            nn.ReLU(),
            nn.Conv2d(mid, mid, 1, bias=False),
            nn.ReLU(),
            nn.Conv2d(mid, teacher_channels, 1, bias=False),
        )
        # softplus⁻¹(init_variance − ε), so the variance starts at init_variance.
        self.log_scale = nn.Parameter(
            torch.full((teacher_channels,), math.log(math.expm1(init_variance - EPS)))
        )

    def variance(self) -> torch.Tensor:
        """(C_t,) per-channel variances σ²."""
        return F.softplus(self.log_scale) + EPS

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """(B, Cs, H, W), (B, Ct, H', W') -> scalar negative log-likelihood (up to a constant)."""
        student, teacher = match_spatial(student, teacher.detach())
        mean = self.regressor(student)
        variance = self.variance().view(1, -1, 1, 1)
        return (0.5 * (torch.log(variance) + (mean - teacher).pow(2) / variance)).mean()
