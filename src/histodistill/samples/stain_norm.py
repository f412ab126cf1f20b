"""Reinhard colour normalisation in CIELAB: move an image's per-channel mean and sd to a target's.

Reinhard et al. (2001) match the mean and standard deviation of each channel in a decorrelated
colour space; for H&E this removes most of the colour difference between labs and scanners. We use
CIELAB (D65) rather than Ruderman's lαβ, as most pathology toolkits do, and compute the statistics
on tissue only (pixels darker than ``max_lightness``), so the amount of glass does not shift them.
"""

from __future__ import annotations

import numpy as np

# sRGB (D65) -> CIE XYZ, and the D65 white point.
_RGB_TO_XYZ = np.array(
    [[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750], [0.0193339, 0.1191920, 0.9503041]]
)
_XYZ_TO_RGB = np.linalg.inv(_RGB_TO_XYZ)
_WHITE = np.array([0.95047, 1.0, 1.08883])
_DELTA = 6 / 29
# LAB L below this is tissue, above it glass / empty background (H&E at 20x; stricter than the 90 default
# of the functions below, which keeps pale stroma in).
TISSUE_LIGHTNESS = 85.0


def _srgb_to_linear(value: np.ndarray) -> np.ndarray:
    """sRGB's transfer curve (IEC 61966-2-1): encoded values in [0, 1] -> linear light."""
    return np.where(value <= 0.04045, value / 12.92, ((value + 0.055) / 1.055) ** 2.4)


# The curve at each of the 256 uint8 codes: one table lookup instead of a power per pixel.
_SRGB_TO_LINEAR = _srgb_to_linear(np.arange(256) / 255)
# Linear light halfway between neighbouring codes: code k covers linear values in [bound k-1, bound k).
_LINEAR_CODE_BOUNDS = _srgb_to_linear((np.arange(255) + 0.5) / 255)


def rgb_to_lab(image: np.ndarray) -> np.ndarray:
    """(..., H, W, 3) uint8 sRGB -> the same shape in float64 CIELAB (L in 0..100)."""
    xyz = _SRGB_TO_LINEAR[image] @ _RGB_TO_XYZ.T / _WHITE
    f = np.where(xyz > _DELTA**3, np.cbrt(xyz), xyz / (3 * _DELTA**2) + 4 / 29)
    return np.stack(
        [116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1
    )


def lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    """(..., H, W, 3) CIELAB -> the same shape in uint8 sRGB (out-of-gamut colours clipped)."""
    fy = (lab[..., 0] + 16) / 116
    f = np.stack([fy + lab[..., 1] / 500, fy, fy - lab[..., 2] / 200], axis=-1)
    xyz = np.where(f > _DELTA, f * f * f, 3 * _DELTA**2 * (f - 4 / 29)) * _WHITE
    # The uint8 code whose rounding interval holds each linear value: a search among 255 boundaries
    # instead of a power per pixel (the same codes as rounding 255 x sRGB(linear), ties aside).
    return np.searchsorted(_LINEAR_CODE_BOUNDS, xyz @ _XYZ_TO_RGB.T).astype(np.uint8)


def lab_stats(image: np.ndarray, max_lightness: float = 90.0) -> tuple[np.ndarray, np.ndarray]:
    """Mean and sd of the LAB channels over tissue pixels (all pixels where none is tissue).

    ``image`` (..., H, W, 3) uint8: one image or a stack of them; returns two (..., 3) arrays, one row of
    statistics per image.
    """
    return _tissue_stats(rgb_to_lab(image), max_lightness)


def _tissue_stats(lab: np.ndarray, max_lightness: float) -> tuple[np.ndarray, np.ndarray]:
    tissue = lab[..., 0] < max_lightness  # (..., H, W)
    empty = ~tissue.any(axis=(-2, -1), keepdims=True)
    weights = (tissue | empty)[..., None].astype(np.float64)  # (..., H, W, 1)
    count = weights.sum(axis=(-3, -2))  # (..., 1)
    mean = (lab * weights).sum(axis=(-3, -2)) / count  # (..., 3)
    variance = (((lab - mean[..., None, None, :]) ** 2) * weights).sum(axis=(-3, -2)) / count
    return mean, np.sqrt(variance)


def reinhard_normalize(
    image: np.ndarray,
    target_mean: np.ndarray,
    target_std: np.ndarray,
    max_lightness: float = 90.0,
    iterations: int = 1,
    tolerance: float = 0.05,
) -> np.ndarray:
    """``image`` (..., H, W, 3) uint8 (one image or a stack, each normalised on its own) with its tissue's
    LAB mean/sd moved to ``target_mean``/``target_std``: (3,), or (..., 3) for a target per image.

    One pass is Reinhard's transfer. It is not exact on uint8 output: out-of-gamut colours are clipped and
    the tissue mask (L < ``max_lightness``) is re-drawn on the new lightness, so dark or pale images end a
    few LAB units off the target. ``iterations > 1`` repeats the transfer on its own output until every
    statistic of every image is within ``tolerance`` LAB units of the target (or the passes run out), so
    the residual no longer tells dark tiles from pale ones.
    """
    stack = np.array(image, copy=True).reshape(-1, *image.shape[-3:])  # (N, H, W, 3)
    goal_mean = np.broadcast_to(target_mean, (*image.shape[:-3], 3)).reshape(-1, 3)  # (N, 3)
    goal_std = np.broadcast_to(target_std, (*image.shape[:-3], 3)).reshape(-1, 3)
    active = np.arange(len(stack))  # images still off the target
    for _ in range(iterations):
        lab = rgb_to_lab(stack[active])
        mean, std = _tissue_stats(lab, max_lightness)  # (n, 3) each
        off = (
            np.maximum(
                np.abs(mean - goal_mean[active]).max(axis=1), np.abs(std - goal_std[active]).max(axis=1)
            )
            > tolerance
        )
        if not off.any():
            break
        active, lab, mean, std = active[off], lab[off], mean[off], std[off]
        scale = goal_std[active] / np.maximum(std, 1e-6)  # (n, 3)
        stack[active] = lab_to_rgb(
            (lab - mean[:, None, None, :]) * scale[:, None, None, :] + goal_mean[active][:, None, None, :]
        )
    return stack.reshape(image.shape)
