"""Augmentation recipes by name, built on torchvision.transforms.v2, plus H&E stain jitter.

Every recipe takes a uint8 tensor (3, H, W) and returns a float32 tensor (3, S, S) normalised
with the backbone's mean/std, where S is the backbone's input size: the backbone's `Preprocess`
decides how data is prepared, so a recipe can never normalise for the wrong model.

``train=False`` drops every random operation and gives the ``eval`` pipeline (resize the shorter
side to S, centre-crop S, normalise), whatever the recipe: validation and test data must be
deterministic.

Recipes (``train=True``):
- ``eval``: no augmentation.
- ``basic``: random horizontal/vertical flips and 90° rotations (tissue has no orientation).
- ``randaugment``: MoMA's recipe, Resize → HFlip → RandAugment(n=2, m=10) → normalise.
- ``mae``: RandomResizedCrop(S, scale=(0.2, 1), bicubic) + HFlip (the MAE paper).
- ``sdmae``: RandomResizedCrop(S) with torchvision's default scale, no flip (SD-MAE official code).
- ``he``: flips and 90° rotations + H&E stain jitter in HED colour space (`HEDJitter`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torchvision.transforms import v2

from histodistill.errors import UserError

# Ruifrok & Johnston (2001) optical-density vectors of haematoxylin, eosin and DAB, one per row;
# each row is the OD an RGB pixel gets from one unit of that stain. Rows are normalised to unit
# length below, so a unit of stain means the same optical density for each.
RGB_FROM_HED = torch.tensor(
    [
        [0.65, 0.70, 0.29],
        [0.07, 0.99, 0.11],
        [0.27, 0.57, 0.78],
    ],
    dtype=torch.float64,
)
RGB_FROM_HED = RGB_FROM_HED / RGB_FROM_HED.norm(dim=1, keepdim=True)
HED_FROM_RGB = torch.linalg.inv(RGB_FROM_HED)

# Intensities below this are clamped before the log, so black pixels have a finite optical density.
_MIN_INTENSITY = 1e-6


def rgb_to_hed(rgb: torch.Tensor) -> torch.Tensor:
    """Stain concentrations (3, H, W) [H, E, DAB] of an RGB image (3, H, W) with values in [0, 1]."""
    optical_density = -torch.log(rgb.clamp_min(_MIN_INTENSITY))  # Beer–Lambert: OD = -log(I / I0), I0 = 1
    matrix = HED_FROM_RGB.to(rgb.dtype)
    # OD (as a row per pixel) = stains @ RGB_FROM_HED, so stains = OD @ HED_FROM_RGB.
    return torch.einsum("chw,cs->shw", optical_density, matrix)


def hed_to_rgb(hed: torch.Tensor) -> torch.Tensor:
    """Inverse of `rgb_to_hed`: RGB (3, H, W) in [0, 1] from stain concentrations (3, H, W)."""
    matrix = RGB_FROM_HED.to(hed.dtype)
    optical_density = torch.einsum("shw,sc->chw", hed, matrix)
    return torch.exp(-optical_density).clamp(0.0, 1.0)


class HEDJitter(nn.Module):
    """Random H&E stain variation (Tellez et al. 2018): in HED space each stain channel s becomes
    ``s * a + b`` with ``a ~ U(1 - sigma, 1 + sigma)`` and ``b ~ U(-bias, bias)`` drawn per image.

    Input and output are uint8 tensors (3, H, W), so it slots in before the float conversion.
    """

    def __init__(self, sigma: float = 0.05, bias: float = 0.05) -> None:
        super().__init__()
        self.sigma = sigma
        self.bias = bias

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        hed = rgb_to_hed(image.to(torch.float64) / 255.0)  # (3, H, W)
        scale = 1.0 + (torch.rand(3, 1, 1, dtype=torch.float64) * 2 - 1) * self.sigma
        shift = (torch.rand(3, 1, 1, dtype=torch.float64) * 2 - 1) * self.bias
        rgb = hed_to_rgb(hed * scale + shift)
        return (rgb * 255.0).round().to(torch.uint8)


class RandomRot90(nn.Module):
    """Rotate by a uniformly drawn multiple of 90°: exact (no interpolation) and label-preserving."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        turns = int(torch.randint(4, ()).item())
        return torch.rot90(image, turns, dims=(-2, -1))


def _input_size(preprocess) -> int:
    """The square side the backbone expects; ``input_size`` may be an int, (H, W) or timm's (C, H, W)."""
    size = preprocess.input_size
    if isinstance(size, int):
        return size
    height, width = tuple(size)[-2:]
    if height != width:
        raise UserError(f"backbone input size {tuple(size)} is not square; patch recipes need square inputs")
    return int(height)


def _normalise(preprocess) -> list[Callable]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(preprocess.mean), list(preprocess.std))]


def _resize_crop(size: int) -> list[Callable]:
    return [v2.Resize(size, antialias=True), v2.CenterCrop(size)]


def _orientation() -> list[Callable]:
    return [v2.RandomHorizontalFlip(), v2.RandomVerticalFlip(), RandomRot90()]


# The uint8 -> uint8 part of each training recipe for input size S (normalisation is appended after).
RECIPES: dict[str, Callable[[int], list[Callable]]] = {
    "eval": lambda size: _resize_crop(size),
    "basic": lambda size: _resize_crop(size) + _orientation(),
    "randaugment": lambda size: _resize_crop(size) + [v2.RandomHorizontalFlip(), v2.RandAugment(num_ops=2, magnitude=10)],
    "mae": lambda size: [
        v2.RandomResizedCrop(size, scale=(0.2, 1.0), interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.RandomHorizontalFlip(),
    ],
    "sdmae": lambda size: [v2.RandomResizedCrop(size, antialias=True)],
    "he": lambda size: _resize_crop(size) + _orientation() + [HEDJitter()],
}


def build_transform(recipe: str, preprocess, train: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 (3, H, W) → float32 (3, S, S) normalised for ``preprocess`` (a `Preprocess`: mean, std,
    input_size, mpp). ``train=False`` gives the deterministic eval pipeline for every recipe."""
    if recipe not in RECIPES:
        raise UserError(f"unknown transform recipe {recipe!r}: use one of {', '.join(RECIPES)}")
    size = _input_size(preprocess)
    ops = RECIPES[recipe](size) if train else _resize_crop(size)
    return v2.Compose(ops + _normalise(preprocess))
