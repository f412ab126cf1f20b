"""Pixel reconstruction targets and the masked-patch MSE of MAE and SD-MAE.

Patches are (B, L, p·p·C) in (p, q, c) order (see `histodistill.models.vit_mae.patchify`).
"""

from __future__ import annotations

import torch


def patch_norm_target(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """MAE's ``norm_pix_loss`` target: each patch minus its mean over all p·p·C values, divided by
    ``sqrt(var + eps)`` (unbiased variance, as ``Tensor.var`` computes it in MAE). (B, L, E) -> (B, L, E)."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + eps) ** 0.5


def channel_norm_target(patches: torch.Tensor, channels: int = 3, eps: float = 1e-6) -> torch.Tensor:
    """SD-MAE's target: each patch normalised per channel over its p·p pixels, ``(x − mean) / (std + eps)``
    with the unbiased std. (B, L, p·p·C) -> (B, L, p·p·C)."""
    b, length, e = patches.shape
    x = patches.reshape(b, length, e // channels, channels)  # (B, L, p·p, C)
    x = (x - x.mean(dim=-2, keepdim=True)) / (x.std(dim=-2, keepdim=True) + eps)
    return x.reshape(b, length, e)


def masked_patch_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over removed patches of each patch's mean squared error; visible patches do not count.

    pred, target: (B, L, E); mask: (B, L), 1 = removed. Computed in float32 so bf16 autocast does not
    round the squared errors.
    """
    per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)  # (B, L)
    mask = mask.float()
    return (per_patch * mask).sum() / mask.sum()
