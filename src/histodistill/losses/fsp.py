"""Flow of solution procedure, FSP (Yim et al., CVPR 2017): match the Gram matrices between consecutive
layers."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def fsp_matrix(bottom: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """(B, C1, H1, W1), (B, C2, H2, W2) -> (B, C1, C2): ``G_ij = Σ_{h,w} F1_i(h,w) · F2_j(h,w) / (h·w)``,
    the larger map average-pooled to the smaller one's size first (the stages of a CNN halve the size)."""
    if bottom.shape[-2:] != top.shape[-2:]:
        small = min(bottom.shape[-2:], top.shape[-2:], key=lambda s: s[0] * s[1])
        bottom, top = F.adaptive_avg_pool2d(bottom, small), F.adaptive_avg_pool2d(top, small)
    return torch.bmm(bottom.flatten(2), top.flatten(2).transpose(1, 2)) / bottom[0, 0].numel()


def fsp_loss(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """Lists of n maps each -> ``Σ_{i<n} mean (G_s^{i,i+1} − G_t^{i,i+1})²`` (the paper's L2 with equal λ,
    averaged over batch and matrix entries as RepDistiller). Needs equal channels layer by layer."""
    losses = []
    for i in range(len(student) - 1):
        g_s = fsp_matrix(student[i], student[i + 1])
        g_t = fsp_matrix(teacher[i].detach(), teacher[i + 1].detach())
        if g_s.shape != g_t.shape:
            raise ValueError(
                f"FSP needs equal channels per layer, got student {tuple(g_s.shape[1:])} and "
                f"teacher {tuple(g_t.shape[1:])} between layers {i} and {i + 1}"
            )
        losses.append((g_s - g_t).pow(2).mean())
    return torch.stack(losses).sum()
