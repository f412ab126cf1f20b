"""Slide-level multiple-instance learning heads: mean pooling, ABMIL (gated attention), TransMIL, and the
registry `create_mil` that also builds CLAM-SB/MB (`histodistill.models.clam`).

Every model (`histodistill.models.mil_base.MILHead`) takes a bag of instance features ``x`` (B, N, D) with an
optional padding mask (B, N) (True = real instance, False = padding) and returns
`MILOutput(logits (B, C), scores (B, N), ...)`; ``loss(output, labels)`` is its training objective.
``scores`` say how much each instance drove the prediction and are what heatmaps draw; they are
0 at padded positions. Padding never changes a bag's output (tests check this for every model).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from histodistill.errors import ConfigError
from histodistill.models.clam import CLAMMB, CLAMSB
from histodistill.models.mil_base import MILHead, MILOutput, full_mask, masked_softmax

__all__ = [
    "ABMIL",
    "CLAMMB",
    "CLAMSB",
    "MIL_MODELS",
    "MILHead",
    "MILOutput",
    "MeanPoolMIL",
    "Standardized",
    "TransMIL",
    "create_mil",
]


class MeanPoolMIL(MILHead):
    """Baseline: the mean of the real instances' features, then a linear classifier.

    Because the classifier is linear, the bag logits equal the mean of per-instance logits; the
    instance ``scores`` are those instance logits for the bag's predicted class, so the heatmap
    shows which tiles pushed the prediction (they do not sum to 1: this is not attention).
    """

    def __init__(self, in_dim: int, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(in_dim, num_classes)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        mask = full_mask(x, mask)
        instance_logits = self.classifier(self.dropout(x))  # (B, N, C)
        weights = mask.to(x.dtype) / mask.sum(dim=1, keepdim=True).clamp_min(1)  # (B, N)
        logits = torch.einsum("bn,bnc->bc", weights, instance_logits)
        predicted = logits.argmax(dim=1)  # (B,)
        scores = instance_logits.gather(2, predicted[:, None, None].expand(-1, x.shape[1], 1)).squeeze(2)
        return MILOutput(logits, scores.masked_fill(~mask, 0.0))


class GatedAttention(nn.Module):
    """Ilse et al. 2018, eq. 9: a_k ∝ exp(wᵀ(tanh(V h_k) ⊙ sigm(U h_k))), softmax over the bag."""

    def __init__(self, dim: int, attention_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.V = nn.Linear(dim, attention_dim)
        self.U = nn.Linear(dim, attention_dim)
        self.w = nn.Linear(attention_dim, 1)
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """h (B, N, L), mask (B, N) -> attention (B, N) summing to 1 over real instances."""
        gated = torch.tanh(self.V(h)) * torch.sigmoid(self.U(h))  # (B, N, A)
        return masked_softmax(self.w(self.dropout(gated)).squeeze(-1), mask)


class ABMIL(MILHead):
    """Attention-based deep MIL with gated attention (Ilse, Tomczak, Welling, ICML 2018).

    Instance features are embedded (Linear + ReLU, the paper's f_ψ on precomputed features),
    pooled by gated attention into z = Σ a_k h_k, and classified by a linear layer.
    """

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        hidden_dim: int = 256,
        attention_dim: int = 128,
        dropout: float = 0.25,
    ) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout))
        self.attention = GatedAttention(hidden_dim, attention_dim, dropout)
        self.classifier = nn.Linear(hidden_dim, num_classes)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        mask = full_mask(x, mask)
        h = self.embed(x)  # (B, N, L)
        attention = self.attention(h, mask)  # (B, N)
        z = torch.einsum("bn,bnl->bl", attention, h)  # (B, L)
        return MILOutput(self.classifier(z), attention)


class SelfAttentionLayer(nn.Module):
    """Pre-norm multi-head self-attention with a residual (TransMIL's TransLayer).

    Exact attention through `scaled_dot_product_attention` (flash / memory-efficient kernels on a
    GPU keep memory linear in N) instead of the paper's Nyström approximation; ``cls_attention``
    recomputes only the class token's row of attention weights, O(N), for the heatmap.
    """

    def __init__(self, dim: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % heads:
            raise ConfigError(f"dim {dim} must be divisible by heads {heads}")
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch, length, dim = x.shape
        qkv = self.qkv(self.norm(x)).reshape(batch, length, 3, self.heads, dim // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, L, d)
        return q, k, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._qkv(x)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return x + self.proj(out.transpose(1, 2).flatten(2))  # (B, L, dim)

    def cls_attention(self, x: torch.Tensor) -> torch.Tensor:
        """Attention of token 0 (the class token) over all tokens, averaged over heads: (B, L)."""
        q, k, _ = self._qkv(x)
        logits = q[:, :, :1] @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, heads, 1, L)
        return logits.softmax(dim=-1).mean(dim=1).squeeze(1)


class PPEG(nn.Module):
    """Pyramid position encoding generator: depthwise 7×7, 5×5 and 3×3 convolutions on the square
    grid of instance tokens, added to the tokens themselves (Shao et al. 2021, section 3.4)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim) for k in (7, 5, 3))

    def forward(self, x: torch.Tensor, side: int) -> torch.Tensor:
        """x (B, 1 + side², dim) with the class token first -> same shape."""
        cls_token, tokens = x[:, :1], x[:, 1:]
        grid = tokens.transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)  # (B, dim, side, side)
        grid = grid + sum(conv(grid) for conv in self.convs)
        return torch.cat([cls_token, grid.flatten(2).transpose(1, 2)], dim=1)


class TransMIL(MILHead):
    """TransMIL (Shao et al., NeurIPS 2021): embed → square-pad → [CLS] → attention → PPEG →
    attention → LayerNorm → classify the class token.

    The square padding repeats the bag's first instances to fill side² tokens, as the paper's code
    does. Each bag is run on its own (its real instances only), so padding in a batch never
    changes a bag's grid; MIL batches are one or a few bags, so the loop costs nothing.
    ``scores`` are the class token's last-layer attention over the bag (the repeated copies' weight
    folded back onto their originals, the class token's own weight left out), summing to 1.
    """

    def __init__(
        self, in_dim: int, num_classes: int, dim: int = 512, heads: int = 8, dropout: float = 0.1
    ) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU())
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.normal_(self.cls_token, std=1e-6)
        self.layer1 = SelfAttentionLayer(dim, heads, dropout)
        self.ppeg = PPEG(dim)
        self.layer2 = SelfAttentionLayer(dim, heads, dropout)
        self.norm = nn.LayerNorm(dim)
        self.classifier = nn.Linear(dim, num_classes)

    def no_weight_decay(self) -> set[str]:
        return {"cls_token"}

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        mask = full_mask(x, mask)
        logits, scores = [], torch.zeros(x.shape[:2], dtype=x.dtype, device=x.device)
        for b in range(x.shape[0]):
            real = mask[b].nonzero().squeeze(1)
            bag_logits, bag_scores = self._forward_bag(x[b : b + 1, real])
            logits.append(bag_logits)
            scores[b, real] = bag_scores
        return MILOutput(torch.cat(logits), scores)

    def _forward_bag(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One bag x (1, n, D) -> logits (1, C), scores (n,)."""
        n = x.shape[1]
        side = math.ceil(math.sqrt(n))
        extra = side * side - n
        h = self.embed(x)  # (1, n, dim)
        h = torch.cat([h, h[:, torch.arange(extra, device=x.device) % n]], dim=1)  # (1, side², dim)
        h = torch.cat([self.cls_token.expand(1, -1, -1), h], dim=1)  # (1, 1 + side², dim)
        h = self.ppeg(self.layer1(h), side)
        attention = self.layer2.cls_attention(h)[0, 1:]  # (side²,) over instance tokens
        h = self.norm(self.layer2(h))
        scores = attention[:n].index_add(0, torch.arange(extra, device=x.device) % n, attention[n:])
        return self.classifier(h[:, 0]), scores / scores.sum()


class Standardized(MILHead):
    """A MIL model whose instance features are z-scored per dimension first: ``(x - mean) / std`` with
    ``mean``, ``std`` (D,) buffers, identity until `fit` sets them from training instances.

    Why: self-supervised ViT features are dominated by a vector shared by every tile (the final LayerNorm's
    bias survives token averaging), so a MIL head on raw features starts nearly blind to what varies between
    tiles (measured: the demo's SD-MAE features vary 0.08 per dimension within a slide around values of
    sd 0.88; ABMIL on them stayed at chance while the same features z-scored separate tumour tiles at
    AUROC 0.89). MAE's linear probe standardises with a non-affine BatchNorm for the same reason.
    """

    def __init__(self, model: nn.Module, in_dim: int) -> None:
        super().__init__()
        self.mil = model
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("std", torch.ones(in_dim))

    @torch.no_grad()
    def fit(self, features: torch.Tensor) -> Standardized:
        """Set the statistics from training instances ``features`` (N, D); a constant dimension keeps sd 1."""
        self.mean.copy_(features.mean(dim=0))
        std = features.std(dim=0) if len(features) > 1 else torch.ones_like(self.std)
        self.std.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)))
        return self

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        return self.mil((x - self.mean) / self.std, mask)  # (B, N, D) -> the wrapped model's output

    def loss(self, output: MILOutput, labels: torch.Tensor) -> torch.Tensor:
        return self.mil.loss(output, labels)


MIL_MODELS: dict[str, type[MILHead]] = {
    "mean": MeanPoolMIL,
    "abmil": ABMIL,
    "transmil": TransMIL,
    "clam_sb": CLAMSB,
    "clam_mb": CLAMMB,
}


def create_mil(name: str, in_dim: int, num_classes: int, standardize: bool = False, **kwargs) -> nn.Module:
    """Build a MIL model by name (``mean``, ``abmil``, ``transmil``, ``clam_sb``, ``clam_mb``);
    ``standardize`` wraps it in `Standardized` (fit its statistics before training)."""
    if name not in MIL_MODELS:
        raise ConfigError(f"unknown MIL model {name!r}; choose one of {sorted(MIL_MODELS)}")
    model = MIL_MODELS[name](in_dim, num_classes, **kwargs)
    return Standardized(model, in_dim) if standardize else model
