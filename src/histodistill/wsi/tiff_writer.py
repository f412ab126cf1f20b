"""Write an RGB image as a tiled, pyramidal TIFF that OpenSlide and TiffSlide read as a slide.

Used by the semi-synthetic slide benchmark and by the tests, which build their own tiny slides.
Levels are successive tiled pages, each smaller than the one before (what OpenSlide's generic-TIFF
reader expects); the microns-per-pixel go into the resolution tags in centimetres, which both
readers turn into ``mpp``. `write_rendered_pyramid_tiff` writes slides too large to hold in
memory, tile by tile, from a function that renders any region at any downsample.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
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
            writer.write(level, **_level_options(index, 2**index, mpp, tile, compression))
    return path


def _level_options(
    index: int, downsample: float, mpp: float | None, tile: int, compression: str | None
) -> dict:
    options = dict(
        photometric="rgb",
        tile=(tile, tile),
        compression=compression,
        metadata=None,
        subfiletype=0 if index == 0 else 1,  # 1 = reduced-resolution copy of the base
    )
    if mpp is not None:
        pixels_per_cm = 1e4 / (mpp * downsample)
        options.update(resolution=(pixels_per_cm, pixels_per_cm), resolutionunit="CENTIMETER")
    return options


def write_rendered_pyramid_tiff(
    path: str | os.PathLike,
    dimensions: tuple[int, int],
    render: Callable[[int, int, int, int, int], np.ndarray],
    mpp: float,
    downsamples: tuple[int, ...] = (1, 4, 16, 64),
    tile: int = 256,
    compression: str = "jpeg",
) -> Path:
    """A BigTIFF pyramid of a ``dimensions`` (W, H) slide, written one tile at a time.

    ``render(x0, y0, w, h, d) -> (h, w, 3) uint8`` draws the pixels of level-0 region x0 + d*i,
    y0 + d*j (i < w, j < h) at downsample ``d``; memory stays at one tile whatever the slide's size.
    """
    import tifffile

    path = Path(path)
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=True) as writer:
        for index, downsample in enumerate(downsamples):
            width, height = dimensions[0] // downsample, dimensions[1] // downsample

            def tiles(width=width, height=height, downsample=downsample) -> Iterator[np.ndarray]:
                for y in range(0, height, tile):
                    for x in range(0, width, tile):
                        pixels = np.full((tile, tile, 3), 255, np.uint8)  # edge tiles are padded
                        w, h = min(tile, width - x), min(tile, height - y)
                        pixels[:h, :w] = render(x * downsample, y * downsample, w, h, downsample)
                        yield pixels

            writer.write(
                tiles(),
                shape=(height, width, 3),
                dtype=np.uint8,
                **_level_options(index, downsample, mpp, tile, compression),
            )
    return path
