"""Tissue mask on a slide thumbnail: saturation Otsu, pen and dark-pixel rejection, morphology.

Stained tissue is coloured and glass is grey, so HSV saturation separates them better than
brightness does (a pale eosin region can be as bright as glass). The steps:

1. saturation S = (max - min) / max per pixel, smoothed with a small median filter (JPEG noise);
2. tissue = S above Otsu's threshold, but never below ``min_saturation`` (on a thumbnail that is
   nearly all glass, Otsu splits the glass noise in two);
3. drop pixels that are not H&E colours: near-black (labels, slide edges, black ink) and green
   or blue pen (in H&E the green channel is the smallest; pen ink has green above red);
4. closing with a disk, filling holes up to ``max_hole_area``, removing components smaller than
   ``min_area``. Areas are fractions of the thumbnail so the config works at any thumbnail size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class TissueConfig:
    """Thresholds of `tissue_mask`; the defaults suit H&E scanned on white glass."""

    thumbnail_size: int = 2048  # longest side of the thumbnail the mask is computed on, pixels
    min_saturation: float = 0.07  # saturation floor under Otsu's threshold, 0..1
    dark_value: int = 40  # pixels whose brightest channel is below this are ink/label/edge, 0..255
    pen_margin: int = 10  # green above red by more than this = pen ink, 0..255
    median_size: int = 3  # median filter on the saturation, pixels (1 = off)
    closing_radius: int = 2  # disk radius of the closing that bridges small gaps, pixels (0 = off)
    max_hole_area: float = 0.01  # holes up to this fraction of the thumbnail are filled (0 = none)
    min_area: float = 0.0005  # components below this fraction of the thumbnail are dropped


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of ``values`` in [0, 1]: the cut maximising between-class variance."""
    hist, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    centers = (edges[:-1] + edges[1:]) / 2
    weight_low = np.cumsum(hist).astype(np.float64)
    weight_high = weight_low[-1] - weight_low
    sum_low = np.cumsum(hist * centers)
    mean_low = sum_low / np.maximum(weight_low, 1)
    mean_high = (sum_low[-1] - sum_low) / np.maximum(weight_high, 1)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2  # cut after bin i
    return float(edges[int(np.argmax(between)) + 1])


def _disk(radius: int) -> np.ndarray:
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return xx**2 + yy**2 <= radius**2


def tissue_mask(thumbnail: np.ndarray, config: TissueConfig = TissueConfig()) -> np.ndarray:
    """(h, w) bool tissue mask of a (h, w, 3) uint8 RGB thumbnail."""
    rgb = thumbnail.astype(np.int16)
    value = rgb.max(axis=2)
    saturation = (value - rgb.min(axis=2)) / np.maximum(value, 1)  # (h, w) in [0, 1]
    if config.median_size > 1:
        saturation = ndimage.median_filter(saturation, size=config.median_size)
    threshold = max(otsu_threshold(saturation), config.min_saturation)
    mask = saturation > threshold
    mask &= value >= config.dark_value
    mask &= rgb[..., 1] - rgb[..., 0] <= config.pen_margin

    area = mask.size
    if config.closing_radius > 0:
        # Pad so the closing does not erode tissue that touches the border.
        pad = config.closing_radius
        padded = np.pad(mask, pad, mode="edge")
        mask = ndimage.binary_closing(padded, structure=_disk(pad))[pad:-pad, pad:-pad]
    if config.max_hole_area > 0:
        holes, n_holes = ndimage.label(ndimage.binary_fill_holes(mask) & ~mask)
        hole_sizes = np.bincount(holes.ravel(), minlength=n_holes + 1)
        small = hole_sizes <= config.max_hole_area * area
        small[0] = False  # label 0 is everything that is not a hole
        mask |= small[holes]
    components, n_components = ndimage.label(mask)
    sizes = np.bincount(components.ravel(), minlength=n_components + 1)
    keep = sizes >= config.min_area * area
    keep[0] = False
    return keep[components]
