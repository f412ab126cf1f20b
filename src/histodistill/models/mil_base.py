"""What every slide-level MIL model shares: its output, its objective, and masked attention helpers.

A MIL model (`MILHead`) maps a bag of instance features ``x`` (B, N, D) with an optional padding mask
(B, N) (True = real instance, False = padding) to a `MILOutput`, and says how it is trained:
``loss(output, labels)``, a plain function of the output and the bag labels, so one training loop (and
a batched one over stacked models) serves every model without knowing which it trains.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class MILOutput(NamedTuple):
    logits: torch.Tensor  # (B, C)
    scores: torch.Tensor  # (B, N), 0 at padded positions
    # What a model's own objective needs besides the logits (CLAM's instance loss), None elsewhere:
    attention: torch.Tensor | None = None  # (B, K, N) attention of each of K branches
    instance_logits: torch.Tensor | None = None  # (B, N, C, 2) each class's instance classifier
    mask: torch.Tensor | None = None  # (B, N) bool, True = real instance


def bag_cross_entropy(output: MILOutput, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the bag logits (B, C) against ``labels`` (B,): every model's bag objective,
    in float32 (the logits may come from bf16 autocast)."""
    return F.cross_entropy(output.logits.float(), labels)


class MILHead(nn.Module):
    """A MIL model: ``forward(x (B, N, D), mask (B, N)) -> MILOutput`` and ``loss(output, labels)``, its
    training objective (a scalar). The objective is the bag cross-entropy unless a model adds terms
    (CLAM's instance loss), so one training loop serves every model."""

    def loss(self, output: MILOutput, labels: torch.Tensor) -> torch.Tensor:
        return bag_cross_entropy(output, labels)


def full_mask(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The padding mask (B, N) bool, all True when none is given."""
    if mask is None:
        return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    return mask.bool()


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim (B, N) that gives padded positions exactly 0 weight."""
    return torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)
