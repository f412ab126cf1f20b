"""Neuron selectivity transfer, NST (Huang & Wang, 2017): match the distributions of the layer's neuron
activation patterns with a polynomial-kernel MMD."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from histodistill.losses.spatial import match_spatial


def poly_kernel_mean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, Ca, N), (B, Cb, N) -> mean over batch and channel pairs of ``k(x, y) = (xᵀy)²``."""
    return torch.bmm(a, b.transpose(1, 2)).pow(2).mean()


def nst_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """One layer pair (B, Cs, H, W), (B, Ct, H', W') -> MMD² between the two sets of channels, each
    channel's spatial pattern L2-normalised:

        MMD² = mean k(s_i, s_i') + mean k(t_j, t_j') − 2 mean k(s_i, t_j),   k(x, y) = (xᵀy)²

    The official code drops the teacher-only term (a constant); we keep it so the loss is 0 when the
    student matches (same gradient). Channel counts may differ; spatial sizes are matched.
    """
    student, teacher = match_spatial(student, teacher.detach())
    s = F.normalize(student.flatten(2), dim=2)  # (B, Cs, H·W)
    t = F.normalize(teacher.flatten(2), dim=2)  # (B, Ct, H·W)
    return poly_kernel_mean(s, s) + poly_kernel_mean(t, t) - 2 * poly_kernel_mean(s, t)
