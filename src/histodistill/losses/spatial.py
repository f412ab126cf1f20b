"""Bring two feature maps to one spatial size, as the layer-matching distillation terms need."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def match_spatial(student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, Cs, Hs, Ws), (B, Ct, Ht, Wt) -> the same maps with the larger one average-pooled to the
    smaller one's (H, W) (adaptive average pooling, as RepDistiller/MoMA do for AT, NST, VID, FT, SimKD),
    so a 16×16 student stage can be compared with a 14×14 ViT patch grid."""
    s_size, t_size = tuple(student.shape[-2:]), tuple(teacher.shape[-2:])
    if s_size == t_size:
        return student, teacher
    if s_size[0] * s_size[1] > t_size[0] * t_size[1]:
        return F.adaptive_avg_pool2d(student, t_size), teacher
    return student, F.adaptive_avg_pool2d(teacher, s_size)
