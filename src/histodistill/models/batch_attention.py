"""Multi-head self-attention across the samples of a batch (MoMA's attention on embeddings).

The (B, D) embeddings are one sequence of B tokens: every sample attends to every other sample in
the batch, so each embedding is re-expressed through its neighbours. As in MoMA: qkv with bias, an
output projection, no residual, no normalisation, no dropout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from histodistill.errors import ConfigError


class BatchAttention(nn.Module):
    def __init__(self, dim: int = 512, num_heads: int = 4, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"embedding dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, D) -> (B, D); row i depends on every row of x."""
        b, d = x.shape
        # (B, 3D) -> (3, heads, B, D/heads): the batch plays the role of the token axis.
        q, k, v = self.qkv(x).reshape(b, 3, self.num_heads, d // self.num_heads).permute(1, 2, 0, 3)
        mixed = F.scaled_dot_product_attention(q, k, v)  # (heads, B, D/heads)
        return self.proj(mixed.transpose(0, 1).reshape(b, d))  # (B, D)
