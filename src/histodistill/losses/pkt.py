"""Probabilistic knowledge transfer, PKT (Passalis & Tefas, ECCV 2018): match conditional probability
distributions built from cosine similarities within the batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-7


def cosine_conditional(features: torch.Tensor) -> torch.Tensor:
    """(B, D) -> (B, B): ``p_{j|i} = K(i, j) / Σ_k K(i, k)`` with the cosine kernel ``K = (cos + 1) / 2``."""
    unit = F.normalize(features.flatten(1), dim=1, eps=EPS)
    kernel = (unit @ unit.T + 1) / 2
    return kernel / kernel.sum(dim=1, keepdim=True)


def pkt_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """(B, D), (B, D') -> ``mean_{i,j} p^t_{j|i} log((p^t_{j|i} + ε) / (p^s_{j|i} + ε))``.

    The paper sums the KL terms; the official code (and RepDistiller/MoMA, whose weight 30000 assumes
    it) averages them over the B² pairs, which we follow. Widths may differ.
    """
    p_student, p_teacher = cosine_conditional(student), cosine_conditional(teacher.detach())
    return (p_teacher * torch.log((p_teacher + EPS) / (p_student + EPS))).mean()
