"""Reinhard colour normalisation in CIELAB: move an image's per-channel mean and sd to a target's.

Reinhard et al. (2001) match the mean and standard deviation of each channel in a decorrelated
colour space; for H&E this removes most of the colour difference between labs and scanners. We use
CIELAB (D65) rather than Ruderman's lαβ, as most pathology toolkits do, and compute the statistics
on tissue only (pixels darker than ``max_lightness``), so the amount of glass does not shift them.
"""

from __future__ import annotations

import numpy as np

# sRGB (D65) -> CIE XYZ, and the D65 white point.
_RGB_TO_XYZ = np.array([[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750],
                        [0.0193339, 0.1191920, 0.9503041]])
_XYZ_TO_RGB = np.linalg.inv(_RGB_TO_XYZ)
_WHITE = np.array([0.95047, 1.0, 1.08883])
_DELTA = 6 / 29
# LAB L below this is tissue, above it glass / empty background (H&E at 20x; stricter than the 90 default
# of the functions below, which keeps pale stroma in).
TISSUE_LIGHTNESS = 85.0


def rgb_to_lab(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 sRGB -> (H, W, 3) float64 CIELAB (L in 0..100)."""
    rgb = image.astype(np.float64) / 255
    linear = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    xyz = linear @ _RGB_TO_XYZ.T / _WHITE
    f = np.where(xyz > _DELTA**3, np.cbrt(xyz), xyz / (3 * _DELTA**2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


def lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    """(H, W, 3) CIELAB -> (H, W, 3) uint8 sRGB (out-of-gamut colours clipped)."""
    fy = (lab[..., 0] + 16) / 116
    f = np.stack([fy + lab[..., 1] / 500, fy, fy - lab[..., 2] / 200], axis=-1)
    xyz = np.where(f > _DELTA, f**3, 3 * _DELTA**2 * (f - 4 / 29)) * _WHITE
    linear = np.clip(xyz @ _XYZ_TO_RGB.T, 0, 1)
    rgb = np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055)
    return np.clip(np.round(rgb * 255), 0, 255).astype(np.uint8)


def lab_stats(image: np.ndarray, max_lightness: float = 90.0) -> tuple[np.ndarray, np.ndarray]:
    """Mean (3,) and sd (3,) of the LAB channels over tissue pixels (all pixels if none is tissue)."""
    lab = rgb_to_lab(image).reshape(-1, 3)  # (H*W, 3)
    tissue = lab[lab[:, 0] < max_lightness]
    pixels = tissue if len(tissue) else lab
    return pixels.mean(axis=0), pixels.std(axis=0)


def reinhard_normalize(
    image: np.ndarray, target_mean: np.ndarray, target_std: np.ndarray, max_lightness: float = 90.0
) -> np.ndarray:
    """``image`` (H, W, 3) uint8 with its tissue's LAB mean/sd moved to ``target_mean``/``target_std``."""
    mean, std = lab_stats(image, max_lightness)
    lab = rgb_to_lab(image)
    normalized = (lab - mean) / np.maximum(std, 1e-6) * target_std + target_mean
    return lab_to_rgb(normalized)
