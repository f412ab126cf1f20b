"""SimKD (Chen et al., CVPR 2022): reuse the teacher's classifier. A projector maps the student's last
feature map to the teacher's; the student is trained only to match that map, and predicts through the
teacher's classifier applied to the pooled projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from histodistill.losses.spatial import match_spatial


class SimKDProjector(nn.Module):
    """Bottleneck projector Cs -> Ct/f -> Ct/f -> Ct (1×1, 3×3, 1×1 convolutions, each + BatchNorm + ReLU;
    ``factor`` f = 2 in the paper and MoMA's comparison)."""

    def __init__(self, student_channels: int, teacher_channels: int, factor: int = 2) -> None:
        super().__init__()
        mid = max(1, teacher_channels // factor)
        self.net = nn.Sequential(
            nn.Conv2d(student_channels, mid, 1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(),
            nn.Conv2d(mid, mid, 3, padding=1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(),
            nn.Conv2d(mid, teacher_channels, 1, bias=False),
            nn.BatchNorm2d(teacher_channels),
            nn.ReLU(),
        )

    def forward(self, student_map: torch.Tensor) -> torch.Tensor:
        return self.net(student_map)

    def predict(self, student_map: torch.Tensor, teacher_classifier: nn.Module) -> torch.Tensor:
        """(B, Cs, H, W) -> logits (B, K): the teacher classifier on the average-pooled projection."""
        return teacher_classifier(self(student_map).mean(dim=(2, 3)))


def simkd_loss(projected: torch.Tensor, teacher_map: torch.Tensor) -> torch.Tensor:
    """``MSE(P(s), t)`` over all elements, the larger map pooled to the smaller one's size."""
    projected, teacher_map = match_spatial(projected, teacher_map.detach())
    return F.mse_loss(projected, teacher_map)
