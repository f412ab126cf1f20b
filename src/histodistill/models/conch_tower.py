"""CONCH v1.5's image tower (Ding et al. 2024, TITAN), built from timm without the CONCH package.

As TRIDENT's ``model_zoo/conchv1_5/conchv1_5.py`` describes it: an iBOT-style ViT-L/16 trunk (LayerScale
initialised at 1.0, QKV bias, LayerNorm eps 1e-6: the key layout and arithmetic of timm's
``vit_large_patch16_224``), a one-query attentional pooler (8 heads, 768-d queries over the 1024-d tokens,
LayerNorms on queries and keys, no biases) and a final LayerNorm. The embedding is the pooled 768-d vector.
Published weights: ``pytorch_model_vision.bin`` in ``MahmoodLab/conchv1_5``, keys ``trunk.*``,
``attn_pool_contrast.*``, ``ln_contrast.*``.

Deviation: the trunk is built for 224-px input (its position table: 14 x 14 + 1) and resamples that table
to the 448-px input at run time with timm's bicubic ``dynamic_img_size``; CONCH's own code interpolates
with DINO's scale-factor rule (grid + 0.1). Both are bicubic; the sampled positions differ slightly.
"""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from torch import nn

TRUNK = "vit_large_patch16_224"


class AttentionalPooler(nn.Module):
    """``n_queries`` learned queries (d_model) attend over context tokens (context_dim): (B, N, Cc) -> (B, Q,
    d)."""

    def __init__(self, d_model: int, context_dim: int, n_head: int = 8, n_queries: int = 1) -> None:
        super().__init__()
        self.heads = n_head
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        self.ln_q = nn.LayerNorm(d_model)
        self.ln_k = nn.LayerNorm(context_dim)
        self.to_q = nn.Linear(d_model, d_model, bias=False)
        self.to_kv = nn.Linear(context_dim, 2 * d_model, bias=False)
        self.to_out = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        q = self.to_q(self.ln_q(self.query)).expand(batch, -1, -1)  # (B, Q, d)
        k, v = self.to_kv(self.ln_k(x)).chunk(2, dim=-1)  # (B, N, d) each

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, h, L, d/h)

        out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v))  # softmax(q k^T / sqrt(d/h)) v
        return self.to_out(out.transpose(1, 2).flatten(2))  # (B, Q, d)


class ConchVisionTower(nn.Module):
    """``forward_features(x)`` (B, 3, S, S) -> (B, 1 + N, 1024) trunk tokens; ``forward_head`` -> (B, 768)."""

    def __init__(self, img_size: int = 224, dynamic_img_size: bool = True) -> None:
        super().__init__()
        self.trunk = timm.create_model(
            TRUNK,
            pretrained=False,
            num_classes=0,
            init_values=1.0,
            img_size=img_size,
            dynamic_img_size=dynamic_img_size,
        )
        self.attn_pool_contrast = AttentionalPooler(
            d_model=768, context_dim=self.trunk.num_features, n_head=8
        )
        self.ln_contrast = nn.LayerNorm(768)
        self.num_features = 768
        self.num_prefix_tokens = self.trunk.num_prefix_tokens

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk.forward_features(x)  # (B, 1 + N, 1024)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.ln_contrast(self.attn_pool_contrast(x)[:, 0])  # (B, 768)


def convert_conch_state(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Resample a stored position table of another grid to the trunk's, as CONCH's loader does."""
    from timm.layers import resample_abs_pos_embed

    own = model.trunk.pos_embed
    stored = state.get("trunk.pos_embed")
    if stored is not None and stored.shape != own.shape:
        state = {
            **state,
            "trunk.pos_embed": resample_abs_pos_embed(
                stored,
                new_size=model.trunk.patch_embed.grid_size,
                num_prefix_tokens=1,
                interpolation="bilinear",
                antialias=False,
            ),
        }
    return state
