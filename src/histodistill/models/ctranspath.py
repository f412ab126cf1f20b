"""CTransPath (Wang et al. 2022): a Swin-T/4 (window 7) whose patch embedding is a small convolutional stem,
built from timm's ``SwinTransformer`` without the ``timm_ctp`` fork that TRIDENT and the authors use.

The stem, as TRIDENT's ``model_zoo/ctranspath/ctran.py`` gives it: two 3x3 stride-2 convolutions without
bias, each followed by BatchNorm and ReLU (3 -> C/8 -> C/4 channels), then a 1x1 convolution to C, then
the LayerNorm timm's Swin puts after its patch embedding. The published weights (``CHIEF_CTransPath.pth``,
state dict under ``model``) are in the layout of timm 0.5 (the fork's base), which timm's Swin converts
itself: patch merging moves to the start of the next stage; attention masks and relative position indices
are buffers it rebuilds. The embedding is Swin's average-pooled, normalised final feature map (768-d).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

SWIN = "swin_tiny_patch4_window7_224"


class ConvStem(nn.Module):
    """(B, 3, H, W) -> (B, H/4, W/4, C) NHWC, as timm's Swin expects from its ``embed_layer``."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        embed_dim: int = 96,
        norm_layer: Any = None,
        **ignored: Any,
    ) -> None:
        super().__init__()
        if patch_size != 4 or embed_dim % 8:
            raise ValueError("CTransPath's stem needs patch_size 4 and embed_dim divisible by 8")
        size = img_size if isinstance(img_size, (tuple, list)) else (img_size, img_size)
        self.img_size, self.patch_size = tuple(size), (4, 4)
        self.grid_size = (size[0] // 4, size[1] // 4)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        layers: list[nn.Module] = []
        width_in, width = in_chans, embed_dim // 8
        for _ in range(2):
            layers += [
                nn.Conv2d(width_in, width, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
            width_in, width = width, width * 2
        layers.append(nn.Conv2d(width_in, embed_dim, kernel_size=1))
        self.proj = nn.Sequential(*layers)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))  # (B, H/4, W/4, C)


def create_ctranspath(**kwargs: Any) -> nn.Module:
    """The architecture, randomly initialised; ``kwargs`` go to timm's Swin (e.g. ``img_size``)."""
    import timm

    return timm.create_model(SWIN, pretrained=False, num_classes=0, embed_layer=ConvStem, **kwargs)


def convert_ctranspath_state(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """The published timm-0.5 layout -> timm's current Swin keys (timm's own converter)."""
    from timm.models.swin_transformer import checkpoint_filter_fn

    return checkpoint_filter_fn(state, model)
