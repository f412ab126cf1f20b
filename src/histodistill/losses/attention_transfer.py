"""Attention transfer, AT (Zagoruyko & Komodakis, ICLR 2017): match where each layer looks."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from histodistill.losses.spatial import match_spatial


def attention_map(features: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """(B, C, H, W) -> (B, H·W): ``Q = mean_c |A_c|^p``, L2-normalised per sample (the paper sums over
    channels; the mean differs by the constant C, which the normalisation removes)."""
    return F.normalize(features.abs().pow(p).mean(1).flatten(1), dim=1)


def at_loss(student: torch.Tensor, teacher: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """One layer pair (B, Cs, H, W), (B, Ct, H', W') -> ``mean_{b,j} (Q_s/‖Q_s‖ − Q_t/‖Q_t‖)²_{b,j}``.

    The paper's ``β/2 · ‖Q_s/‖Q_s‖ − Q_t/‖Q_t‖‖_2`` per sample is taken squared and averaged over batch
    and positions, as the official code and RepDistiller/MoMA do (β = 1000 in MoMA's comparison).
    Channel counts may differ; spatial sizes are matched by `match_spatial`.
    """
    student, teacher = match_spatial(student, teacher)
    return (attention_map(student, p) - attention_map(teacher.detach(), p)).pow(2).mean()
