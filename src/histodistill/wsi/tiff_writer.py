"""Write an RGB image as a tiled, pyramidal TIFF that OpenSlide and TiffSlide read as a slide.

Used by the semi-synthetic slide benchmark and by the tests, which build their own tiny slides.
Levels are successive tiled pages, each half the size of the one before (what OpenSlide's
generic-TIFF reader expects); the microns-per-pixel go into the resolution tags in centimetres,
which both readers turn into ``mpp``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from histodistill.io import atomic_path


def pyramid_levels(image: np.ndarray, min_size: int = 64) -> list[np.ndarray]:
    """The image and its 2x-downsampled copies until the shorter side would drop below ``min_size``."""
    levels = [image]
    while min(levels[-1].shape[:2]) // 2 >= min_size:
        height, width = levels[-1].shape[:2]
        smaller = Image.fromarray(levels[-1]).resize((width // 2, height // 2), Image.Resampling.BOX)
        levels.append(np.asarray(smaller))
    return levels


def write_pyramid_tiff(
    path: str | os.PathLike,
    image: np.ndarray,
    mpp: float | None,
    tile: int = 256,
    min_level_size: int = 64,
    compression: str | None = "jpeg",
) -> Path:
    """Write ``image`` (H, W, 3) uint8 as a pyramidal tiled TIFF at ``mpp`` microns per pixel.

    ``mpp=None`` writes no resolution, which is how tests make a slide whose mpp is unknown.
    The file is written atomically. Returns the path.
    """
    import tifffile

    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
    path = Path(path)
    levels = pyramid_levels(image, min_level_size)
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=False) as writer:
        for index, level in enumerate(levels):
            options = dict(
                photometric="rgb",
                tile=(tile, tile),
                compression=compression,
                metadata=None,
                subfiletype=0 if index == 0 else 1,  # 1 = reduced-resolution copy of the base
            )
            if mpp is not None:
                pixels_per_cm = 1e4 / (mpp * 2**index)
                options.update(resolution=(pixels_per_cm, pixels_per_cm), resolutionunit="CENTIMETER")
            writer.write(level, **options)
    return path
