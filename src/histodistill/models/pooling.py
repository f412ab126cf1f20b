"""The embedding of a backbone: how its output tokens become one vector per image.

Every registered model states its embedding by name (``BackboneEntry.embedding``), and `pool` applies it,
so the definition lives in one place and is never re-implemented per model:

- ``head``: the model's own pooled output (timm's ``forward_head(pre_logits=True)``: the class token of a
  ViT with ``global_pool="token"``, average pooling of a CNN, an attention pooler of a wrapped model);
- ``cls``: the class token (token 0) of the final, normalised tokens;
- ``cls+mean_patch``: the class token concatenated with the mean of the patch tokens, register tokens
  excluded (Virchow, Virchow2: twice the width);
- ``mean_patch``: the mean of the patch tokens, class and register tokens excluded.
"""

from __future__ import annotations

import torch
from torch import nn

from histodistill.errors import ConfigError

EMBEDDINGS = ("head", "cls", "cls+mean_patch", "mean_patch")


def embedding_dim(width: int, embedding: str) -> int:
    """The pooled dimension for tokens (or a head) of ``width`` channels."""
    return 2 * width if embedding == "cls+mean_patch" else width


def pool(model: nn.Module, features: torch.Tensor, embedding: str) -> torch.Tensor:
    """``features`` of ``model.forward_features`` -> (B, D) as ``embedding`` defines it.

    Token definitions need (B, N, C) tokens whose first ``model.num_prefix_tokens`` are the class token
    and the register tokens, in that order (timm's and transformers' layout); raises ``ValueError`` for
    an unknown embedding.
    """
    if embedding == "head":
        return model.forward_head(features, pre_logits=True)
    if embedding not in EMBEDDINGS:
        raise ConfigError(f"unknown embedding {embedding!r}; use one of {EMBEDDINGS}")
    prefix = int(model.num_prefix_tokens)
    cls, patches = features[:, 0], features[:, prefix:]  # (B, C), (B, N - prefix, C)
    if embedding == "cls":
        return cls
    if embedding == "mean_patch":
        return patches.mean(dim=1)
    return torch.cat([cls, patches.mean(dim=1)], dim=-1)  # (B, 2C)
