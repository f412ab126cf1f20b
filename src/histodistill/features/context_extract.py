"""Context-aware extraction: each tile's feature is the centre cell of the s x s window around it.

The MCM-KD student is fine-tuned on s x s context windows (`histodistill.data.context_windows`), so
it can also be *used* on them: ``histodistill extract --context-window s`` reads, for every tile, the
window of s x s tiles centred on it (one read at the tiling's mpp), resizes it so each cell has the
backbone's input size (the same `window_transform` as fine-tuning), runs the backbone on the whole
window, pools its spatial map to the s x s grid (`grid_pool`) and keeps the centre cell. The output
is the ordinary features folder, so MIL reads it unchanged.

Every tile gets a window, border tiles included: cells that are not tissue or lie outside the slide
are simply the pixels there (glass, or the reader's white beyond the edge). Context features go to
``features_<model>-context<s>/``, never into the per-patch ``features_<model>/`` folder, so resuming
one kind of extraction can never pick up files of the other.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from histodistill.data.context_windows import ContextWindowDataset, window_transform
from histodistill.data.slide_dataset import marked_unreadable
from histodistill.errors import ConfigError, UserError
from histodistill.models.backbones import Backbone
from histodistill.models.grid_head import grid_pool, spatial_features
from histodistill.wsi.coords import read_coords
from histodistill.wsi.slide import UnreadableRegion


def context_suffix(side: int | None) -> str:
    """The features folder's suffix: ``""`` for per-patch features, ``-context<s>`` for context features."""
    return "" if side is None else f"-context{side}"


class CentreCell(nn.Module):
    """(B, 3, s*S, s*S) normalised windows -> (B, C): the backbone's spatial map pooled over the centre cell.

    Exact when the map side is a multiple of s (ResNets: a 3 x 224-px window gives 21 x 21, 7 x 7 per
    cell); otherwise `grid_pool`'s adaptive bins share a border pixel with the neighbours. ViTs are
    pooled over the patch tokens of the centre cell (their class token sees the whole window).
    """

    def __init__(self, backbone: Backbone, side: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.side = side

    @property
    def num_features(self) -> int:
        return self.backbone.num_features

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        cells = grid_pool(spatial_features(self.backbone, windows), self.side)  # (B, s*s, C), row-major
        return cells[:, self.side * self.side // 2]  # (B, C): row s//2, column s//2


class CentreCellTiles(Dataset):
    """Every tile of one coords file as ``(window, coords)``: the transformed s x s window centred on the
    tile (float (3, s*S, s*S)) and the tile's top-left ``coords`` long (2,), in coords-file order.

    A window is kept when at least one of its s*s cells is a tile, which the centre always is, so every
    tile gets one; our coords whose tiles are not on `histodistill tile`'s grid are refused. ``slide_path``:
    the slide, for coords that do not name it (CLAM, TRIDENT). With ``mark_unreadable`` (`extract`), coords
    are ``(x, y, readable)`` and a window touching pixels the slide file cannot give is marked unreadable
    instead of raising `UnreadableRegion` (`SlideTileDataset` does the same).
    """

    def __init__(
        self,
        coords_path: str | os.PathLike,
        slide_path: str | os.PathLike | None = None,
        *,
        transform,
        side: int,
        mark_unreadable: bool = False,
    ) -> None:
        self.mark_unreadable = mark_unreadable
        self.windows = ContextWindowDataset(
            coords_path, side=side, min_fraction=1 / side**2, slide_path=slide_path, transform=transform
        )
        self.coords_path = Path(coords_path)
        self.slide_id = self.windows.slide_id  # extract names the features file after it
        self.patch_size, self.target_mpp = self.windows.patch_size, self.windows.target_mpp
        self.centre = side * side // 2
        # A tile off the grid is not its own window's centre cell: its window would be cut elsewhere or not at
        # all.
        coords, _ = read_coords(coords_path)  # (N, 2)
        if not np.array_equal(self.windows.cell_coords[:, self.centre], coords):
            raise UserError(
                f"{coords_path}: its tiles are not on the grid `histodistill tile` writes, so context "
                "windows cannot be centred on them; tile the slide with `histodistill tile` (or extract "
                "without `context_window=...`)"
            )

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            window, cells, _valid, _teacher = self.windows[index]
        except UnreadableRegion:  # the window touches pixels the slide file cannot give: the tile is left out
            if not self.mark_unreadable:
                raise
            x, y = (int(v) for v in self.windows.cell_coords[index, self.centre])
            side = self.windows.window_px
            return marked_unreadable(
                torch.zeros((3, side, side), dtype=torch.uint8), self.windows.transform, x, y
            )
        if not self.mark_unreadable:
            return window, cells[self.centre]  # (3, s*S, s*S), (2,) = the tile's own top-left
        x, y = (int(v) for v in cells[self.centre])
        return window, torch.tensor((x, y, 1), dtype=torch.long)  # (3, s*S, s*S), (x, y, readable)


def check_context_side(backbone: Backbone, side: int) -> None:
    """Refuse a window side or a model that cannot give context features, naming the option and the fix."""
    if side < 3 or side % 2 == 0:
        raise ConfigError(
            f"`context_window={side}`: must be an odd number >= 3 so the window has a centre "
            "tile (e.g. 3); leave it out for per-patch features"
        )
    if backbone.feature_kind == "tokens" and not getattr(backbone.model, "dynamic_img_size", False):
        size = backbone.spec.preprocess.input_size
        raise UserError(
            f"`context_window={side}`: {backbone.spec.name} is a ViT with a fixed {size}-px input and cannot "
            f"take {side * size}-px windows; use a CNN, or a ViT built with dynamic_img_size=True (e.g. an "
            "MCM-KD checkpoint trained that way)"
        )


def centre_cell_extraction(backbone: Backbone, side: int):
    """What `extract_slides` runs with ``context_window=side``: ``(model, tiles_of)``, where ``model`` maps
    windows to features and ``tiles_of(coords_path, slide_path)`` is the `CentreCellTiles` of one slide."""
    check_context_side(backbone, side)
    transform = window_transform(backbone.spec.preprocess, side)  # each cell resized like a lone tile
    return CentreCell(backbone, side), partial(
        CentreCellTiles, transform=transform, side=side, mark_unreadable=True
    )
