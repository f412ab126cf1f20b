"""Relational KD, RKD (Park et al., CVPR 2019): match distances between samples and angles between
triplets."""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-12


def pairwise_distance(features: torch.Tensor) -> torch.Tensor:
    """(B, D) -> (B, B) Euclidean distances, zero diagonal."""
    squared = features.pow(2).sum(1)
    distance = (squared[:, None] + squared[None, :] - 2 * features @ features.T).clamp(min=EPS).sqrt()
    return distance * (1 - torch.eye(len(features), device=features.device, dtype=features.dtype))


def rkd_distance_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``Huber(ψ_D(s), ψ_D(t))`` with ``ψ_D = ‖x_i − x_j‖ / μ``, μ the mean distance over pairs i ≠ j."""

    def normalised(x: torch.Tensor) -> torch.Tensor:
        distance = pairwise_distance(x)
        return distance / distance[distance > 0].mean()

    with torch.no_grad():
        target = normalised(teacher)
    return F.smooth_l1_loss(normalised(student), target)


def triplet_cosines(features: torch.Tensor) -> torch.Tensor:
    """(B, D) -> (B³,): ``ψ_A(i, j, k) = ⟨e_ij, e_kj⟩``, e_ij the unit vector from x_j to x_i
    (the cosine of the angle at j)."""
    # (B, B, D): [j, i] = x_i − x_j
    difference = F.normalize(features[None, :, :] - features[:, None, :], p=2, dim=2)
    return torch.bmm(difference, difference.transpose(1, 2)).flatten()


def rkd_angle_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``Huber(ψ_A(s), ψ_A(t))`` over all triplets."""
    with torch.no_grad():
        target = triplet_cosines(teacher)
    return F.smooth_l1_loss(triplet_cosines(student), target)


def rkd_loss(
    student: torch.Tensor, teacher: torch.Tensor, w_distance: float = 25.0, w_angle: float = 50.0
) -> torch.Tensor:
    """(B, D), (B, D') pooled features -> ``w_d · L_dist + w_a · L_angle`` (paper and official code:
    25 and 50). Widths may differ: only relations between samples are compared."""
    student, teacher = student.flatten(1), teacher.flatten(1)
    return w_distance * rkd_distance_loss(student, teacher) + w_angle * rkd_angle_loss(student, teacher)
