"""How images must be prepared for a backbone: a small value object that travels with the weights."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """How images must be prepared for a backbone: normalisation, square input side, and the
    microns per pixel it was trained at (``None`` when unknown, e.g. ImageNet models)."""

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    input_size: int = 224
    mpp: float | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocess:
        return cls(tuple(data["mean"]), tuple(data["std"]), int(data["input_size"]), data.get("mpp"))
