"""Grid pooling and the per-cell projection head of MCM-KD.

The student sees a whole context window of s x s tiles. Its spatial feature map is pooled to an
s x s grid (adaptive average pooling), so grid cell (i, j) summarises exactly the pixels of tile
(i, j) when the map side is a multiple of s; a projection head shared by all cells then maps each
cell's feature to the teacher's dimension. Cells are ordered row-major: index ``i * s + j`` is row
``i`` (y) and column ``j`` (x), the same order as `histodistill.data.context_windows` uses.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from histodistill.errors import ConfigError


def tokens_to_map(tokens: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """ViT tokens (B, prefix + h*w, D) -> spatial map (B, D, h, w), dropping class/register tokens."""
    patches = tokens[:, num_prefix_tokens:]  # (B, h*w, D)
    side = round(patches.shape[1] ** 0.5)
    if side * side != patches.shape[1]:
        raise ValueError(f"cannot arrange {patches.shape[1]} patch tokens as a square grid")
    return patches.transpose(1, 2).reshape(patches.shape[0], patches.shape[2], side, side)  # (B, D, h, w)


def spatial_features(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The backbone's spatial feature map (B, C, h, w), whether it is a CNN ("map") or a ViT ("tokens")."""
    features = backbone.forward_features(images)
    if backbone.feature_kind == "map":
        return features  # (B, C, h, w)
    return tokens_to_map(features, backbone.num_prefix_tokens)


def grid_pool(feature_map: torch.Tensor, side: int) -> torch.Tensor:
    """(B, C, h, w) -> (B, side*side, C): the mean feature of each grid cell, cells in row-major order.

    With h and w multiples of ``side`` every cell averages exactly its own h/side x w/side block;
    otherwise adaptive pooling's overlapping bins are used (cells then share border pixels).
    """
    pooled = F.adaptive_avg_pool2d(feature_map, side)  # (B, C, s, s)
    return pooled.flatten(2).transpose(1, 2)  # (B, s*s, C)


class GridHead(nn.Module):
    """One projection applied to every grid cell: (B, S, C) -> (B, S, D_teacher).

    Shared across cells (our reading of "a projection head per cell"): each cell is the same kind of
    object (a tile), the head is dropped after fine-tuning, and sharing keeps its size independent
    of s. ``kind="linear"`` is a single Linear; ``kind="mlp"`` is Linear-GELU-Linear with
    ``hidden_dim`` units (default: the input dimension).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        kind: Literal["linear", "mlp"] = "linear",
        hidden_dim: int | None = None,
    ) -> None:
        super().__init__()
        if kind == "linear":
            self.net: nn.Module = nn.Linear(in_dim, out_dim)
        elif kind == "mlp":
            hidden = hidden_dim or in_dim
            self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))
        else:
            raise ConfigError(f"head kind must be 'linear' or 'mlp', got {kind!r}")

    def forward(self, cells: torch.Tensor) -> torch.Tensor:
        return self.net(cells)  # Linear acts on the last dim: (B, S, C) -> (B, S, D)
