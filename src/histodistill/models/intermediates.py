"""Intermediate feature maps of a `Backbone`, for distillation terms that compare layers (AT, VID, FSP...).

One forward pass through timm's ``forward_intermediates`` gives the pooled feature, the final feature
map and the maps of the chosen layers, so asking for maps costs no second pass.

Layers are named by their index in the backbone's *pyramid*: for a CNN, timm's ``feature_info`` (the stem
then one entry per stage, e.g. ResNet-18: act1, layer1..layer4 at strides 2..32), except that an
EfficientNet's last level is its 1280-channel conv-head map (after ``conv_head`` + ``bn2``) instead of timm's
320-channel ``blocks.6``, as MoMA's ``extract_endpoints`` lists it (EfficientNet-B0: 16, 24, 40, 112, 1280);
for a ViT (one ``feature_info`` entry per block, all at the patch stride), five blocks standing in for the
stem and four stages: 0, ⌈d/4⌉−1, ⌈d/2⌉−1, ⌈3d/4⌉−1, d−1 (ViT-B: blocks 0, 2, 5, 8, 11). A ViT's maps are its
patch tokens laid out on the patch grid (B, D, H/p, W/p), prefix tokens dropped. Negative indices count from
the end, as in Python.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from timm.models.efficientnet import EfficientNet

from histodistill.errors import UserError
from histodistill.models.backbones import Backbone

# The index that stands for the final feature map (an EfficientNet's conv head) among ``feature_info``
# indices.
HEAD = -1


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
    if ends_with_conv_head(backbone):
        return [*range(count - 1), HEAD]
    if backbone.feature_kind == "map":
        return list(range(count))
    return [0] + [math.ceil(count * q / 4) - 1 for q in (1, 2, 3, 4)]


def ends_with_conv_head(backbone: Backbone) -> bool:
    """An EfficientNet: its final map is the conv head's, at the last stage's stride, not a stage output."""
    return isinstance(backbone.model, EfficientNet)


def resolve_layers(backbone: Backbone, layers: list[int], what: str) -> list[int]:
    """Pyramid positions (negative allowed) -> ``feature_info`` indices; refuses positions out of range."""
    levels = pyramid(backbone)
    bad = [i for i in layers if not -len(levels) <= i < len(levels)]
    if bad:
        raise UserError(
            f"{what}={layers}: {backbone.spec.name} has {len(levels)} pyramid levels "
            f"(0..{len(levels) - 1}, negative counts from the end); {bad} is out of range"
        )
    return [levels[i] for i in layers]


def layer_channels(backbone: Backbone, indices: list[int]) -> list[int]:
    """Channels of each ``feature_info`` index (the C of its (B, C, H, W) map; `HEAD`: the model's width)."""
    info = backbone.model.feature_info
    return [int(backbone.model.num_features) if i == HEAD else int(info[i]["num_chs"]) for i in indices]


def layer_sizes(backbone: Backbone, indices: list[int]) -> list[int]:
    """Side of each index's map at the backbone's input size: input size / the level's stride."""
    info = backbone.model.feature_info
    return [backbone.preprocess.input_size // int(info[-1 if i == HEAD else i]["reduction"]) for i in indices]


def forward_layers(backbone: Backbone, images: torch.Tensor, indices: list[int]) -> LayerFeatures:
    """images (B, 3, H, W) -> `LayerFeatures` with the maps of ``feature_info`` ``indices``, in that order."""
    if not indices:  # pooled features and final map only: the plain forward
        final = backbone.forward_features(images)
        return LayerFeatures(pooled=backbone.pool(final), final=final, maps=[])
    order = sorted(set(indices) - {HEAD}) or [0]  # the final map comes with any intermediate
    final, maps = backbone.model.forward_intermediates(images, indices=order)
    by_index = {**dict(zip(order, maps, strict=True)), HEAD: final}
    pooled = backbone.pool(final)  # (B, D), as Backbone.forward
    return LayerFeatures(pooled=pooled, final=final, maps=[by_index[i] for i in indices])
