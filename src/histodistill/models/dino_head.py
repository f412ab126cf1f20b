"""DINO-style projection head with a weight-normalised last layer whose norm is fixed at 1.

SD-MAE puts one on the encoder's visible tokens (student) and one on the decoder's visible outputs
(teacher). Fixing the last layer's norm (DINO's ``norm_last_layer``) keeps the prototypes on the
unit sphere, which stabilises the softmax over thousands of outputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from histodistill.errors import ConfigError


class DINOHead(nn.Module):
    """``Linear(in, H) → GELU → [Linear(H, H) → GELU]·(layers−2) → Linear(H, bottleneck)`` → L2-normalise →
    weight-normalised ``Linear(bottleneck, out_dim, bias=False)``.

    (..., in_dim) -> (..., out_dim): applied to every token independently. The last layer is
    ``weight = g · v / ‖v‖`` per output row with ``g`` (``parametrizations.weight.original0``) set to
    1 and frozen, so every row of the effective weight has norm 1 whatever the optimiser does to v.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 4096,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        num_layers: int = 3,
    ) -> None:
        super().__init__()
        if num_layers < 2:
            raise ConfigError(f"DINOHead needs num_layers >= 2, got {num_layers}")
        dims = [in_dim] + [hidden_dim] * (num_layers - 1)
        layers: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:], strict=True):
            layers += [nn.Linear(a, b), nn.GELU()]
        layers.append(nn.Linear(hidden_dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                # SD-MAE's trunc_normal_ wrapper cuts at a = -std, b = std (±1σ); timm's and PyTorch's
                # defaults cut at ±2 absolute, i.e. ±100σ at std 0.02: no truncation at all.
                nn.init.trunc_normal_(module.weight, std=0.02, a=-0.02, b=0.02)
                nn.init.zeros_(module.bias)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        norm = self.last_layer.parametrizations.weight.original0  # (out_dim, 1): the per-row g
        with torch.no_grad():
            norm.fill_(1.0)
        norm.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1)  # (..., bottleneck) on the unit sphere
        return self.last_layer(x)  # (..., out_dim)

    def forward_token_mean(self, x: torch.Tensor) -> torch.Tensor:
        """The head applied to every token, averaged over tokens: (B, K, in_dim) -> (B, out_dim).

        Equal to ``self(x).mean(dim=1)``, but the last layer is linear and bias-free, so it is applied
        once to the mean of the normalised bottlenecks instead of to each of the K tokens (the widest
        product of the head: bottleneck x 4096 per token)."""
        bottleneck = F.normalize(self.mlp(x), dim=-1)  # (B, K, bottleneck)
        return self.last_layer(bottleneck.mean(dim=1))  # (B, out_dim)
