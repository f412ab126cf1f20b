"""Tissue mask of a slide image at a known resolution: glass, ink, pen and dark-pixel rejection, morphology.

Glass is bright and grey; stained tissue is coloured, and may be as bright as glass (pale eosin,
loose stroma) or far darker. So a pixel is **glass only when it is bright AND unsaturated**, and
everything else that carries some colour is tissue unless a rule below rejects it:

1. saturation S = (max - min) / max and value V = max per pixel; S is median-filtered against JPEG
   noise;
2. glass = V >= ``glass_value`` and S < the glass cut. The cut is ``min_saturation`` when the user
   sets it (any value, also below Otsu's), else Otsu's threshold of S over the bright pixels only,
   clipped to [``auto_saturation_floor``, ``auto_saturation_ceiling``]. The ceiling is what keeps an
   image without glass whole: Otsu on an all-tissue image splits loose stroma from nuclei-dense
   areas, and the ceiling stops that cut before it reaches stained tissue;
3. dim pixels (V < ``glass_value``) are never glass; they are tissue when they carry a trace of
   colour (S >= ``auto_saturation_floor``), so grey debris and grayscale images are not;
4. not tissue: near-black (V < ``dark_value``: labels, slide edges), green/blue pen (green above
   red by more than ``pen_margin``; in H&E green is the smallest channel), and two inks judged on
   the colour averaged over ``ink_smoothing_um``: navy/violet-blue (hue in ``ink_hue`` degrees,
   S >= ``ink_min_saturation``, V <= ``ink_max_value``) and black/grey (V <= ``black_ink_max_value``,
   S < ``black_ink_max_saturation``). Hematoxylin is blue-violet too, but nuclei are small and sit
   in eosin, so their neighbourhood average is purple (hue > 255 deg on the sample images) and
   paler; tissue that dark is also strongly coloured. An ink stroke is a wide, uniform band (see
   docs/tiling.md for the measurements and the inks this does not catch: red is kept);
5. closing with a disk of ``closing_um``, holes up to ``max_hole_um2`` filled, components below
   ``min_area_um2`` dropped.

Thresholds and morphology are OpenCV's (``cv2.threshold`` with THRESH_OTSU, ``cv2.medianBlur``,
``cv2.morphologyEx``, ``cv2.connectedComponentsWithStats``). Sizes are in microns, so the config
means the same at any mask resolution.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class TissueConfig:
    """Thresholds of `tissue_mask`; the defaults suit H&E scanned on white glass."""

    mask_mpp: float | None = None  # resolution of the mask, um/px; None: `mask_mpp_for` the tile size
    min_saturation: float | None = None  # glass/tissue saturation cut 0..1; None: automatic (see module doc)
    auto_saturation_floor: float = 0.04  # least colour counted as stain, and lowest automatic cut, 0..1
    auto_saturation_ceiling: float = 0.10  # highest automatic cut: pale stain (S >= 0.1) is never glass
    glass_value: int = 200  # only pixels at least this bright (brightest channel) can be glass, 0..255
    dark_value: int = 40  # pixels whose brightest channel is below this are ink/label/edge, 0..255
    pen_margin: int = 10  # green above red by more than this = green/blue pen, 0..255
    ink_hue: tuple[float, float] = (200.0, 255.0)  # hue range of navy/violet-blue ink, degrees
    ink_min_saturation: float = 0.3  # ink is strongly coloured...
    ink_max_value: int = 160  # ...and dark (brightest channel), 0..255
    black_ink_max_value: int = 100  # black/grey ink: averaged colour at most this dark (brightest channel)...
    black_ink_max_saturation: float = (
        0.25  # ...and this grey; H&E that dark is coloured (S >= 0.27 on the samples)
    )
    ink_smoothing_um: float = 24.0  # side of the box the ink rules average colour over, microns
    median_um: float = 12.0  # median filter on the saturation, microns (0 = off)
    closing_um: float = 16.0  # radius of the closing that bridges small gaps, microns (0 = off)
    max_hole_um2: float = 50_000.0  # holes up to this area are filled (lumens above it stay out), um^2
    min_area_um2: float = 1_000.0  # components below this area (a few cells) are dropped, um^2


# A mask of a tile needs enough pixels to measure its tissue fraction, and no more: this many mask
# pixels across one tile, but never coarser than MAX_MASK_MPP (islands of ~50 um stay visible).
MASK_PIXELS_PER_TILE = 16
MAX_MASK_MPP = 8.0


def mask_mpp_for(config: TissueConfig, patch_size_level0: float, slide_mpp: float) -> float:
    """The mask resolution in um/px: the config's, else a 16th of a tile's side, at most 8 um/px."""
    if config.mask_mpp is not None:
        return config.mask_mpp
    return min(MAX_MASK_MPP, patch_size_level0 * slide_mpp / MASK_PIXELS_PER_TILE)


def hsv_saturation_value(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(h, w) float32 saturation in [0, 1] and (h, w) uint8 value (brightest channel) of RGB uint8."""
    hsv = cv2.cvtColor(np.ascontiguousarray(rgb, np.uint8), cv2.COLOR_RGB2HSV)  # S = (max - min) / max * 255
    return hsv[..., 1].astype(np.float32) / 255, hsv[..., 2]


def lacks_colour(rgb: np.ndarray, config: TissueConfig = TissueConfig()) -> bool:  # noqa: B008 - frozen
    """Whether an image shows something (over 1 % of its pixels darker than glass) but no stain colour
    (under 1 % of its pixels as saturated as stain): a grayscale or unstained scan, not blank glass."""
    saturation, value = hsv_saturation_value(rgb)
    shows_something = (value < config.glass_value).mean() > 0.01
    return shows_something and float(np.percentile(saturation, 99)) < config.auto_saturation_floor


def glass_saturation_cut(saturation: np.ndarray, value: np.ndarray, config: TissueConfig) -> float:
    """The saturation below which a bright pixel is glass (see the module docstring, step 2)."""
    if config.min_saturation is not None:
        return config.min_saturation
    bright = saturation[value >= config.glass_value]
    if bright.size < 64:  # no glass to model: only the floor applies
        return config.auto_saturation_floor
    as_uint8 = np.round(bright * 255).astype(np.uint8).reshape(-1, 1)
    otsu, _ = cv2.threshold(as_uint8, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return float(np.clip(otsu / 255, config.auto_saturation_floor, config.auto_saturation_ceiling))


def _odd_kernel(microns: float, mpp: float) -> int:
    size = round(microns / mpp)
    return size + 1 - size % 2  # odd, >= 1


def ink_mask(rgb: np.ndarray, mpp: float, config: TissueConfig) -> np.ndarray:
    """(h, w) bool: navy/violet-blue ink, black/grey ink and green/blue pen, judged on the
    neighbourhood-averaged colour, and their rim."""
    size = max(3, _odd_kernel(config.ink_smoothing_um, mpp))
    averaged = cv2.blur(rgb, (size, size))
    hsv = cv2.cvtColor(averaged, cv2.COLOR_RGB2HSV_FULL)  # hue 0..255 for 0..360 degrees
    hue = hsv[..., 0].astype(np.float32) * (360 / 256)
    saturation, value = hsv[..., 1], hsv[..., 2]
    navy = (
        (hue >= config.ink_hue[0])
        & (hue <= config.ink_hue[1])
        & (saturation >= config.ink_min_saturation * 255)
        & (value <= config.ink_max_value)
    )
    # Black marker, RGB about (45, 45, 55), is above the near-black cut and carries a trace of blue.
    black = (value <= config.black_ink_max_value) & (saturation < config.black_ink_max_saturation * 255)
    # The pen rule again on the averaged colour: per pixel, noise lets some pixels of a wide pen stroke pass
    # it. Pen is strongly coloured; a greyish-blue average (a tissue rim on bluish glass) is not pen.
    pen = (averaged[..., 1].astype(np.int16) - averaged[..., 0] > config.pen_margin) & (
        saturation >= config.ink_min_saturation * 255
    )
    ink = navy | black | pen
    # The averaging pales a stroke's rim with the glass beside it; widen the mask by the box it used.
    return cv2.dilate(ink.astype(np.uint8), np.ones((size, size), np.uint8)).astype(bool)


def _fill_small_holes(mask: np.ndarray, max_pixels: float) -> np.ndarray:
    """Fill background components that do not touch the border and have at most ``max_pixels``."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats((~mask).astype(np.uint8), connectivity=4)
    h, w = mask.shape
    x, y, bw, bh, area = (stats[:, i] for i in range(5))
    enclosed = (x > 0) & (y > 0) & (x + bw < w) & (y + bh < h)
    small = enclosed & (area <= max_pixels)
    small[0] = False  # label 0 is the tissue itself
    return mask | small[labels]


def tissue_mask(rgb: np.ndarray, mpp: float, config: TissueConfig = TissueConfig()) -> np.ndarray:  # noqa: B008
    """(h, w) bool tissue mask of a (h, w, 3) uint8 RGB image whose pixels are ``mpp`` microns wide."""
    rgb = np.ascontiguousarray(rgb)
    saturation, value = hsv_saturation_value(rgb)
    median = _odd_kernel(config.median_um, mpp)
    if median > 1:
        s8 = cv2.medianBlur(np.round(saturation * 255).astype(np.uint8), median)
        saturation = s8.astype(np.float32) / 255
    cut = glass_saturation_cut(saturation, value, config)
    glass = (value >= config.glass_value) & (saturation < cut)
    coloured = saturation >= min(cut, config.auto_saturation_floor)
    mask = ~glass & coloured & (value >= config.dark_value)
    mask &= rgb[..., 1].astype(np.int16) - rgb[..., 0] <= config.pen_margin
    mask &= ~ink_mask(rgb, mpp, config)

    pixel_area = mpp * mpp  # um^2
    radius = round(config.closing_um / mpp)
    mask8 = mask.astype(np.uint8)
    if radius > 0:
        # Pad so the closing does not erode tissue that touches the border.
        disk = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
        padded = cv2.copyMakeBorder(mask8, radius, radius, radius, radius, cv2.BORDER_REPLICATE)
        mask8 = cv2.morphologyEx(padded, cv2.MORPH_CLOSE, disk)[radius:-radius, radius:-radius]
    mask = mask8.astype(bool)
    if config.max_hole_um2 > 0:
        mask = _fill_small_holes(mask, config.max_hole_um2 / pixel_area)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= config.min_area_um2 / pixel_area
    keep[0] = False  # background
    return keep[labels]
