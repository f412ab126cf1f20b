"""Correlation congruence, CC (Peng et al., ICCV 2019): match the batch's kernel correlation matrix."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def correlation_matrix(embeddings: torch.Tensor, gamma: float = 0.4, order: int = 2) -> torch.Tensor:
    """(B, D) -> (B, B): the Gaussian RBF kernel ``exp(−γ‖x_i − x_j‖²)`` between L2-normalised embeddings
    through its order-P Taylor expansion, as the paper computes it:
    ``k(x, y) ≈ Σ_{p=0..P} exp(−2γ) (2γ)^p / p! · (x·y)^p``."""
    unit = F.normalize(embeddings, dim=1)
    dot = unit @ unit.T
    return sum(math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * dot**p for p in range(order + 1))


def cc_loss(student: torch.Tensor, teacher: torch.Tensor, gamma: float = 0.4, order: int = 2) -> torch.Tensor:
    """(B, D), (B, D) embeddings -> ``‖C_t − C_s‖²_F / B²`` (the paper's L_CC)."""
    batch = student.shape[0]
    difference = correlation_matrix(student, gamma, order) - correlation_matrix(
        teacher.detach(), gamma, order
    )
    return difference.pow(2).sum() / batch**2
