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
- ``randaugment``: MoMA's recipe, Resize → HFlip → timm RandAugment ``rand-m10-n2-mstd0.5`` (the
  official op set with Invert and SolarizeAdd, each op applied with p = 0.5, magnitude ~ N(10, 0.5)
  clipped to [0, 10], fill = the backbone's mean) → normalise.
- ``finetune``: MAE/SD-MAE fine-tuning (timm ``create_transform`` as their code calls it):
  RandomResizedCrop(S, bicubic) → HFlip → RandAugment ``rand-m9-mstd0.5-inc1`` → normalise →
  RandomErasing(p = 0.25, per-pixel normal values).
- ``mae``: RandomResizedCrop(S, scale=(0.2, 1), bicubic) + HFlip (the MAE paper).
- ``sdmae``: RandomResizedCrop(S) with torchvision's default scale, no flip (SD-MAE official code).
- ``linprobe``: `SingleDrawResizedCrop` (S, bicubic, scale (0.08, 1)) + HFlip: the linear probe of MAE's
  ``main_linprobe.py`` and SD-MAE's ``run_mae_eval_linear.py`` ("weak augmentation").
- ``he``: flips and 90° rotations + H&E stain jitter in HED colour space (`HEDJitter`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import numpy as np
import torch
from timm.data.auto_augment import rand_augment_transform
from timm.data.random_erasing import RandomErasing
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


class SingleDrawResizedCrop(nn.Module):
    """RandomResizedCrop as MAE's and SD-MAE's linear probes draw it (their ``RandomResizedCrop`` subclass,
    after BYOL's TF code): one draw of the area fraction ~ U(``scale``) and log aspect ratio ~ U(log
    ``ratio``), the box clipped to the image, then a bicubic resize to ``size`` x ``size``.

    torchvision's RandomResizedCrop instead redraws up to 10 times until the box fits and then falls back
    to a centre crop, which gives other crops for large areas and extreme ratios. uint8 (3, H, W) in and out.
    """

    def __init__(
        self, size: int, scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3)
    ) -> None:
        super().__init__()
        self.size, self.scale, self.ratio = size, scale, ratio

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        area = height * width * torch.empty(1).uniform_(*self.scale).item()
        aspect = math.exp(torch.empty(1).uniform_(math.log(self.ratio[0]), math.log(self.ratio[1])).item())
        crop_w = min(round(math.sqrt(area * aspect)), width)
        crop_h = min(round(math.sqrt(area / aspect)), height)
        top = int(torch.randint(0, height - crop_h + 1, (1,)).item())
        left = int(torch.randint(0, width - crop_w + 1, (1,)).item())
        return v2.functional.resized_crop(
            image,
            top,
            left,
            crop_h,
            crop_w,
            [self.size, self.size],
            interpolation=v2.InterpolationMode.BICUBIC,
            antialias=True,
        )


class TorchSeeded(nn.Module):
    """Run a timm transform, which draws from Python's `random` and NumPy's global generator, with both
    seeded from torch's generator (then restored): the per-sample torch seeding of
    `histodistill.data.datamodule.SeededAugmentation` then fixes its draws too. With ``pil=True`` the
    uint8 (3, H, W) tensor goes through PIL, which timm's RandAugment needs, and comes back as uint8."""

    def __init__(self, transform: Callable, pil: bool) -> None:
        super().__init__()
        self.transform, self.pil = transform, pil

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        seed = int(torch.randint(2**31 - 1, ()).item())
        python_state, numpy_state = random.getstate(), np.random.get_state()
        random.seed(seed)
        np.random.seed(seed)
        try:
            if not self.pil:
                return self.transform(image)
            return v2.functional.pil_to_tensor(self.transform(v2.functional.to_pil_image(image)))
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def timm_randaugment(config: str, preprocess, size: int, interpolation: str | None = None) -> TorchSeeded:
    """timm's RandAugment (``rand-m10-n2-mstd0.5`` ...) filling uncovered pixels with the backbone's mean.

    ``interpolation`` None draws bilinear or bicubic per op (MoMA's call passes none); the MAE/SD-MAE
    fine-tuning transform passes ``bicubic``. ``translate_const`` is only read by the absolute
    translations, which the ``rand`` op set does not use (it translates by 45 % of the size).
    """
    hparams = {
        "translate_const": int(size * 0.45),
        "img_mean": tuple(min(255, round(255 * m)) for m in preprocess.mean),
    }
    if interpolation is not None:
        from timm.data.transforms import str_to_pil_interp

        hparams["interpolation"] = str_to_pil_interp(interpolation)
    return TorchSeeded(rand_augment_transform(config, hparams), pil=True)


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


def _finetune(size: int, preprocess) -> list[Callable]:
    # timm.data.create_transform(is_training=True, auto_augment="rand-m9-mstd0.5-inc1",
    # interpolation="bicubic"), as MAE's and SD-MAE's fine-tuning build it (RandomErasing comes after
    # normalisation: see AFTER_NORMALISE).
    return [
        v2.RandomResizedCrop(size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.RandomHorizontalFlip(),
        timm_randaugment("rand-m9-mstd0.5-inc1", preprocess, size, interpolation="bicubic"),
    ]


# The uint8 -> uint8 part of each training recipe for input size S and the backbone's `Preprocess`
# (normalisation is appended after).
RECIPES: dict[str, Callable[[int, object], list[Callable]]] = {
    "eval": lambda size, pre: _resize_crop(size),
    "basic": lambda size, pre: _resize_crop(size) + _orientation(),
    "randaugment": lambda size, pre: (
        _resize_crop(size) + [v2.RandomHorizontalFlip(), timm_randaugment("rand-m10-n2-mstd0.5", pre, size)]
    ),
    "mae": lambda size, pre: [
        v2.RandomResizedCrop(
            size, scale=(0.2, 1.0), interpolation=v2.InterpolationMode.BICUBIC, antialias=True
        ),
        v2.RandomHorizontalFlip(),
    ],
    "sdmae": lambda size, pre: [v2.RandomResizedCrop(size, antialias=True)],
    "linprobe": lambda size, pre: [SingleDrawResizedCrop(size), v2.RandomHorizontalFlip()],
    "he": lambda size, pre: _resize_crop(size) + _orientation() + [HEDJitter()],
    "finetune": _finetune,
}

# Training ops that act on the normalised float tensor (timm's RandomErasing draws normalised noise).
AFTER_NORMALISE: dict[str, Callable[[], list[Callable]]] = {
    "finetune": lambda: [
        TorchSeeded(RandomErasing(probability=0.25, mode="pixel", max_count=1, device="cpu"), pil=False)
    ],
}


def build_transform(recipe: str, preprocess, train: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 (3, H, W) → float32 (3, S, S) normalised for ``preprocess`` (a `Preprocess`: mean, std,
    input_size, mpp). ``train=False`` gives the deterministic eval pipeline for every recipe."""
    if recipe not in RECIPES:
        raise UserError(f"unknown transform recipe {recipe!r}: use one of {', '.join(RECIPES)}")
    size = _input_size(preprocess)
    if not train:
        return v2.Compose(_resize_crop(size) + _normalise(preprocess))
    after = AFTER_NORMALISE.get(recipe, lambda: [])()
    return v2.Compose(RECIPES[recipe](size, preprocess) + _normalise(preprocess) + after)
