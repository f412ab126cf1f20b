"""Masking whole tiles of a context window: which cells to hide, and what to paint over them.

MCM-KD hides some of the s x s tiles of a window from the student and asks it to predict the
teacher's features of the hidden ones from their neighbours. Masking happens on normalised images,
so a fill of 0 is the dataset mean colour (the "mean" fill); the "learned" fill is one trainable
value per channel, starting at that mean.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from histodistill.errors import ConfigError


def masked_cell_count(num_cells: int, ratio: float, count: int | None = None) -> int:
    """How many of ``num_cells`` cells to mask: ``count`` when given, else ``round(ratio * num_cells)``
    (Python rounds halves to even: 0.5 of 9 cells is 4, an effective ratio of 0.44), kept in
    [1, num_cells - 1] so every window has something to predict and something to predict it from."""
    if num_cells < 2:
        raise ValueError(f"masking needs at least 2 cells per window, got {num_cells}")
    return min(max(round(ratio * num_cells) if count is None else count, 1), num_cells - 1)


def random_cell_mask(
    batch_size: int,
    num_cells: int,
    ratio: float,
    generator: torch.Generator | None = None,
    device=None,
    count: int | None = None,
) -> torch.Tensor:
    """(B, S) bool, True = masked: exactly `masked_cell_count` cells per window, drawn independently per
    window."""
    count = masked_cell_count(num_cells, ratio, count)
    scores = torch.rand(batch_size, num_cells, generator=generator, device=device)
    # A cell is masked when its random score is among the `count` smallest of its window.
    ranks = scores.argsort(dim=1).argsort(dim=1)  # (B, S): rank of each cell's score
    return ranks < count


def grid_side(num_cells: int) -> int:
    """s for a window of s*s cells."""
    side = math.isqrt(num_cells)
    if side * side != num_cells:
        raise ValueError(f"{num_cells} cells do not form a square grid")
    return side


def cell_mask_to_pixels(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, s*s) cell mask -> (B, 1, H, W) pixel mask; H and W must be multiples of s (one tile = H/s x
    W/s)."""
    side = grid_side(mask.shape[1])
    if height % side or width % side:
        raise ValueError(f"window {height}x{width} is not an exact {side}x{side} grid of tiles")
    grid = mask.view(mask.shape[0], 1, side, side)  # (B, 1, s, s), row-major cells
    # (B, 1, H, W)
    return grid.repeat_interleave(height // side, dim=2).repeat_interleave(width // side, dim=3)


class CellMasker(nn.Module):
    """Paint masked cells of normalised windows (B, 3, H, W) with the fill value; the grid side s
    follows from the mask's (B, s*s) shape."""

    def __init__(self, fill: Literal["mean", "learned"] = "mean", channels: int = 3) -> None:
        super().__init__()
        if fill not in ("mean", "learned"):
            raise ConfigError(f"fill must be 'mean' or 'learned', got {fill!r}")
        self.fill = fill
        # Named mask_token so the optimiser's no-weight-decay rule covers it (optim/optimizer.py).
        value = torch.zeros(1, channels, 1, 1)
        if fill == "learned":
            self.mask_token = nn.Parameter(value)
        else:
            self.register_buffer("mask_token", value, persistent=False)

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        pixels = cell_mask_to_pixels(mask, images.shape[-2], images.shape[-1])
        return torch.where(pixels, self.mask_token.to(images.dtype), images)  # (B, 3, H, W)
