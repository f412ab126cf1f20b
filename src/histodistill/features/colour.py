"""The colour-only control extractor: per tile, the mean and sd of its tissue's CIELAB channels.

A slide task that this extractor solves leaks a colour shortcut (scanner, stain batch, source image);
a model that beats it on a task where it sits at chance has learned more than colour. It writes the
same files as `extract_slides` (``features`` (N, 6) float32, ``coords`` (N, 2), the tiling attrs),
so every downstream command reads it unchanged. Tiles the slide file cannot give are left out, named and
recorded as `extract` does (`histodistill.data.feature_files.record_unreadable`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from histodistill.data.feature_files import (
    EXTRACTOR_JSON,
    UNREADABLE_ATTR,
    record_unreadable,
    write_slide_features,
)
from histodistill.data.slide_dataset import SlideTileDataset
from histodistill.features.extract import extract_slide
from histodistill.io import write_json
from histodistill.samples.stain_norm import TISSUE_LIGHTNESS, lab_stats
from histodistill.wsi.coords import coords_files

COLOUR_SLUG = "colour-lab-mean-sd"


def colour_features(coords_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Features of every slide of a tiling output into ``out_dir/features_colour-lab-mean-sd``;
    finished slides are skipped. Returns the features folder."""
    features_dir = Path(out_dir) / f"features_{COLOUR_SLUG}"
    write_json(
        features_dir / EXTRACTOR_JSON,
        {
            "model": COLOUR_SLUG,
            "feature_dim": 6,
            "source": "no weights",
            "features": "LAB mean (3) and sd (3) of the tile's tissue pixels",
        },
    )
    for coords_path in coords_files(coords_dir):
        target = features_dir / f"{coords_path.stem}.h5"
        if target.exists():
            continue
        # (3, H, W) uint8 tensors at the tiling's mpp
        tiles = SlideTileDataset(coords_path, mark_unreadable=True)
        features, coords, unreadable = extract_slide(lab_features, tiles, desc=tiles.slide_id)
        record_unreadable(features_dir, tiles.slide_id, unreadable, len(tiles))
        write_slide_features(
            target,
            features,
            coords,
            {
                "slide_id": tiles.slide_id,
                "extractor": COLOUR_SLUG,
                "patch_size": tiles.patch_size,
                "target_mpp": tiles.target_mpp,
                UNREADABLE_ATTR: len(unreadable),
            },
        )
    return features_dir


def lab_features(tiles: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) uint8 RGB tiles -> (B, 6) float32: LAB mean and sd of each tile's tissue pixels."""
    return torch.from_numpy(
        np.stack(
            [np.concatenate(lab_stats(tile.permute(1, 2, 0).numpy(), TISSUE_LIGHTNESS)) for tile in tiles]
        ).astype(np.float32)
    )
