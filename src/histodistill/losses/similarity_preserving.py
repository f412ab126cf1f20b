"""Similarity-preserving KD, SP (Tung & Mori, ICCV 2019): match the batch's pairwise similarities."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def batch_similarity(features: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (B, B): ``G = Q Qᵀ`` with Q = features flattened per sample, each row L2-normalised."""
    flat = features.flatten(1)
    return F.normalize(flat @ flat.T, dim=1)


def sp_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """(B, ...), (B, ...) -> ``‖G̃_s − G̃_t‖²_F / B²``. Any shapes with the same batch: the similarity
    is between samples, so layers of different widths, sizes or kinds (map vs tokens) compare."""
    batch = student.shape[0]
    return (batch_similarity(student) - batch_similarity(teacher.detach())).pow(2).sum() / batch**2
