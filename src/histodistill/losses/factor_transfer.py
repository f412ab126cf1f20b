"""Factor transfer, FT (Kim et al., NeurIPS 2018): a paraphraser, trained first to reconstruct the
teacher's last feature map, extracts "teacher factors"; a translator maps the student's map to the same
factor space, and the student matches the normalised factors."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from histodistill.losses.spatial import match_spatial


def _conv(c_in: int, c_out: int, transpose: bool = False, bn: bool = True) -> nn.Sequential:
    conv = nn.ConvTranspose2d if transpose else nn.Conv2d
    norm = [nn.BatchNorm2d(c_out)] if bn else []
    return nn.Sequential(conv(c_in, c_out, 3, padding=1), *norm, nn.LeakyReLU(0.1))


class Paraphraser(nn.Module):
    """Auto-encoder on the teacher map: three 3×3 convolutions C -> C -> m -> m (the factor, m = rate · C)
    and three transposed convolutions back, each followed by LeakyReLU(0.1); with ``bn`` a BatchNorm before
    each activation. RepDistiller builds it with ``use_bn=False`` (its translator keeps BN)."""

    def __init__(self, channels: int, rate: float = 0.5, bn: bool = False) -> None:
        super().__init__()
        factor = max(1, round(channels * rate))
        self.encoder = nn.Sequential(
            _conv(channels, channels, bn=bn), _conv(channels, factor, bn=bn), _conv(factor, factor, bn=bn)
        )
        self.decoder = nn.Sequential(
            _conv(factor, factor, True, bn),
            _conv(factor, channels, True, bn),
            _conv(channels, channels, True, bn),
        )
        self.factor_channels = factor

    def reconstruction_loss(self, teacher: torch.Tensor) -> torch.Tensor:
        """The pre-training stage: ``MSE(decoder(encoder(t)), t)``."""
        teacher = teacher.detach()
        return F.mse_loss(self.decoder(self.encoder(teacher)), teacher)


def translator(student_channels: int, factor_channels: int) -> nn.Sequential:
    """Student map -> factor space: three 3×3 convolutions Cs -> Cs -> m -> m (the paper's translator)."""
    return nn.Sequential(
        _conv(student_channels, student_channels),
        _conv(student_channels, factor_channels),
        _conv(factor_channels, factor_channels),
    )


def ft_loss(student_factor: torch.Tensor, teacher_factor: torch.Tensor, p: int = 1) -> torch.Tensor:
    """(B, m, H, W) factors -> ``mean |F_s/‖F_s‖₂ − F_t/‖F_t‖₂|^p`` with each factor vectorised per
    sample (the paper's L_FT, p = 1, averaged over elements)."""
    student_factor, teacher_factor = match_spatial(student_factor, teacher_factor.detach())
    s = F.normalize(student_factor.flatten(1), dim=1)
    t = F.normalize(teacher_factor.flatten(1), dim=1)
    return (s - t).abs().pow(p).mean()
