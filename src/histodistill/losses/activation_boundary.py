"""Activation boundaries, AB (Heo et al., AAAI 2019): teach the student which neurons the teacher
switches on, with a hinge-like margin around zero."""

from __future__ import annotations

import torch
from torch import nn

from histodistill.losses.spatial import match_spatial


def ab_loss(student: torch.Tensor, teacher: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """(B, C, H, W) connected student map and teacher map -> the paper's alternative L2, summed over
    elements and averaged over the batch:

        L = Σ [ ρ(t) · relu(m − s)² + (1 − ρ(t)) · relu(m + s)² ] / B,    ρ(t) = 1[t > 0]

    An active teacher neuron asks the student response to exceed +m, an inactive one to stay below −m.
    """
    active = (teacher.detach() > 0).to(student.dtype)
    per_element = active * torch.relu(margin - student).pow(2) + (1 - active) * torch.relu(
        margin + student
    ).pow(2)
    return per_element.sum() / student.shape[0]


class ABConnectors(nn.Module):
    """One connector per layer pair (1×1 convolution + BatchNorm, student channels -> teacher channels,
    as the paper) and the layer weights ``2^(i − n + 1)`` of the official code (deeper layers weigh more).
    A pair marked in ``identity`` (RepDistiller's ``Connector``: same channels and same map size) has no
    connector: the student map itself meets the boundary.

    forward(student maps, teacher maps) -> ``Σ_i w_i · ab_loss(connector_i(s_i), t_i)``.
    """

    def __init__(
        self,
        student_channels: list[int],
        teacher_channels: list[int],
        margin: float = 1.0,
        identity: list[bool] | None = None,
    ) -> None:
        super().__init__()
        self.margin = margin
        identity = identity or [False] * len(student_channels)
        self.connectors = nn.ModuleList(
            nn.Identity() if same else nn.Sequential(nn.Conv2d(s, t, 1, bias=False), nn.BatchNorm2d(t))
            for s, t, same in zip(student_channels, teacher_channels, identity, strict=True)
        )
        n = len(student_channels)
        self.layer_weights = [2.0 ** (i - n + 1) for i in range(n)]

    def forward(self, student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
        total = student[0].new_zeros(())
        for connector, weight, s, t in zip(
            self.connectors, self.layer_weights, student, teacher, strict=True
        ):
            s, t = match_spatial(s, t)
            total = total + weight * ab_loss(connector(s), t, self.margin)
        return total
