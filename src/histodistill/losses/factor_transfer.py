"""Factor transfer, FT (Kim et al., NeurIPS 2018): a paraphraser, trained first to reconstruct the
teacher's last feature map, extracts "teacher factors"; a translator maps the student's map to the same
factor space, and the student matches the normalised factors."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from histodistill.losses.spatial import match_spatial


def _conv(c_in: int, c_out: int, transpose: bool = False) -> nn.Sequential:
    conv = nn.ConvTranspose2d if transpose else nn.Conv2d
    return nn.Sequential(conv(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.1))


class Paraphraser(nn.Module):
    """Auto-encoder on the teacher map: three 3×3 convolutions C -> C -> m -> m (the factor, m = rate · C)
    and three transposed convolutions back; BatchNorm + LeakyReLU(0.1) after each (the paper's design)."""

    def __init__(self, channels: int, rate: float = 0.5) -> None:
        super().__init__()
        factor = max(1, round(channels * rate))
        self.encoder = nn.Sequential(_conv(channels, channels), _conv(channels, factor), _conv(factor, factor))
        self.decoder = nn.Sequential(_conv(factor, factor, True), _conv(factor, channels, True),
                                     _conv(channels, channels, True))
        self.factor_channels = factor

    def reconstruction_loss(self, teacher: torch.Tensor) -> torch.Tensor:
        """The pre-training stage: ``MSE(decoder(encoder(t)), t)``."""
        teacher = teacher.detach()
        return F.mse_loss(self.decoder(self.encoder(teacher)), teacher)


def translator(student_channels: int, factor_channels: int) -> nn.Sequential:
    """Student map -> factor space: three 3×3 convolutions Cs -> Cs -> m -> m (the paper's translator)."""
    return nn.Sequential(_conv(student_channels, student_channels), _conv(student_channels, factor_channels),
                         _conv(factor_channels, factor_channels))


def ft_loss(student_factor: torch.Tensor, teacher_factor: torch.Tensor, p: int = 1) -> torch.Tensor:
    """(B, m, H, W) factors -> ``mean |F_s/‖F_s‖₂ − F_t/‖F_t‖₂|^p`` with each factor vectorised per
    sample (the paper's L_FT, p = 1, averaged over elements)."""
    student_factor, teacher_factor = match_spatial(student_factor, teacher_factor.detach())
    s = F.normalize(student_factor.flatten(1), dim=1)
    t = F.normalize(teacher_factor.flatten(1), dim=1)
    return (s - t).abs().pow(p).mean()
