"""The MoMA/CRD embedding head: pooled feature -> low-dimensional unit vector."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ProjectionHead(nn.Module):
    """``Linear(D, H) -> ReLU -> Linear(H, out_dim) -> L2-normalise``; H defaults to D (MoMA's "mlp" head).

    (B, D) -> (B, out_dim) with unit rows. ``hidden_dim=0`` gives a single Linear (CRD's head).
    """

    def __init__(self, in_dim: int, out_dim: int = 512, hidden_dim: int | None = None) -> None:
        super().__init__()
        hidden = in_dim if hidden_dim is None else hidden_dim
        if hidden:
            self.net = nn.Sequential(
                nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim)
            )
        else:
            self.net = nn.Linear(in_dim, out_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(features), dim=1)
