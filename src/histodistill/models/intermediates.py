"""Intermediate feature maps of a `Backbone`, for distillation terms that compare layers (AT, VID, FSP...).

One forward pass through timm's ``forward_intermediates`` gives the pooled feature, the final feature
map and the maps of the chosen layers, so asking for maps costs no second pass.

Layers are named by their index in the backbone's *pyramid*: for a CNN, timm's ``feature_info`` (the stem
then one entry per stage, e.g. ResNet-18: act1, layer1..layer4 at strides 2..32); for a ViT (one
``feature_info`` entry per block, all at the patch stride), five blocks standing in for the stem and four
stages: 0, ⌈d/4⌉−1, ⌈d/2⌉−1, ⌈3d/4⌉−1, d−1 (ViT-B: blocks 0, 2, 5, 8, 11). A ViT's maps are its patch
tokens laid out on the patch grid (B, D, H/p, W/p), prefix tokens dropped. Negative indices count from
the end, as in Python.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from histodistill.errors import UserError
from histodistill.models.backbones import Backbone


@dataclass
class LayerFeatures:
    """What one forward pass yields: ``pooled`` (B, D), ``final`` (the last feature map: (B, D, h, w) for
    a CNN, (B, N, D) tokens for a ViT) and ``maps``, one (B, C_i, H_i, W_i) per asked layer."""

    pooled: torch.Tensor
    final: torch.Tensor
    maps: list[torch.Tensor]


def pyramid(backbone: Backbone) -> list[int]:
    """The backbone's pyramid as indices into timm's ``feature_info`` (see the module docstring)."""
    count = len(backbone.model.feature_info)
    if backbone.feature_kind == "map":
        return list(range(count))
    return [0] + [math.ceil(count * q / 4) - 1 for q in (1, 2, 3, 4)]


def resolve_layers(backbone: Backbone, layers: list[int], what: str) -> list[int]:
    """Pyramid positions (negative allowed) -> ``feature_info`` indices; refuses positions out of range."""
    levels = pyramid(backbone)
    bad = [i for i in layers if not -len(levels) <= i < len(levels)]
    if bad:
        raise UserError(f"{what}={layers}: {backbone.spec.name} has {len(levels)} pyramid levels "
                        f"(0..{len(levels) - 1}, negative counts from the end); {bad} is out of range")
    return [levels[i] for i in layers]


def layer_channels(backbone: Backbone, indices: list[int]) -> list[int]:
    """Channels of each ``feature_info`` index (the C of its (B, C, H, W) map)."""
    return [int(backbone.model.feature_info[i]["num_chs"]) for i in indices]


def forward_layers(backbone: Backbone, images: torch.Tensor, indices: list[int]) -> LayerFeatures:
    """images (B, 3, H, W) -> `LayerFeatures` with the maps of ``feature_info`` ``indices``, in that order."""
    if not indices:  # pooled features and final map only: the plain forward
        final = backbone.forward_features(images)
        return LayerFeatures(pooled=backbone.pool(final), final=final, maps=[])
    order = sorted(set(indices))
    final, maps = backbone.model.forward_intermediates(images, indices=order)
    by_index = dict(zip(order, maps, strict=True))
    pooled = backbone.pool(final)  # (B, D), as Backbone.forward
    return LayerFeatures(pooled=pooled, final=final, maps=[by_index[i] for i in indices])
