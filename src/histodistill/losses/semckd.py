"""Semantic calibration for cross-layer KD, SemCKD (Chen et al., AAAI 2021): every student layer
learns from every teacher layer, weighted per sample by an attention over teacher layers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from histodistill.losses.spatial import match_spatial


def _regressor(c_in: int, c_out: int) -> nn.Sequential:
    """1×1, 3×3, 1×1 convolutions c_in -> 2·c_out -> 2·c_out -> c_out (BatchNorm + ReLU between)."""
    mid = 2 * c_out
    return nn.Sequential(
        nn.Conv2d(c_in, mid, 1, bias=False),
        nn.BatchNorm2d(mid),
        nn.ReLU(),
        nn.Conv2d(mid, mid, 3, padding=1, bias=False),
        nn.BatchNorm2d(mid),
        nn.ReLU(),
        nn.Conv2d(mid, c_out, 1, bias=False),
    )


class _Embed(nn.Module):
    """A row of the batch similarity matrix (B,) -> query/key (B // factor,): Linear-ReLU-Linear-L2."""

    def __init__(self, batch_size: int, dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(batch_size, 2 * dim), nn.ReLU(), nn.Linear(2 * dim, dim))

    def forward(self, similarity: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(similarity), dim=1)


def semckd_loss(per_pair: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """per_pair (B, n_s, n_t) per-sample MSEs, attention (B, n_s, n_t) rows summing to 1 ->
    ``Σ_{b,i,j} α_bij · MSE_bij / (B · n_s)``."""
    return (attention * per_pair).sum() / (per_pair.shape[0] * per_pair.shape[1])


class SemCKDLoss(nn.Module):
    """The whole SemCKD term: regressors for each (student layer i, teacher layer j) pair, the layer
    attention ``α_b,i,· = softmax_j(q_i(b) · k_j(b) / soft)`` whose queries/keys embed row b of each
    layer's batch similarity ``G = F Fᵀ``, and `semckd_loss`.

    The query/key embeddings read a whole similarity row, so the batch size is part of the model
    (``batch_size``, as in the official code, which skips smaller batches).
    """

    def __init__(
        self,
        student_channels: list[int],
        teacher_channels: list[int],
        batch_size: int,
        soft: float = 1.0,
        factor: int = 4,
    ) -> None:
        super().__init__()
        self.batch_size, self.soft = batch_size, soft
        dim = max(1, batch_size // factor)
        self.queries = nn.ModuleList(_Embed(batch_size, dim) for _ in student_channels)
        self.keys = nn.ModuleList(_Embed(batch_size, dim) for _ in teacher_channels)
        self.regressors = nn.ModuleList(
            nn.ModuleList(_regressor(s, t) for t in teacher_channels) for s in student_channels
        )

    def attention(self, student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
        """-> (B, n_s, n_t) attention of each student layer over the teacher layers."""

        def similarity(f: torch.Tensor) -> torch.Tensor:
            flat = f.flatten(1)
            return flat @ flat.T  # (B, B)

        # (B, n_s, d)
        q = torch.stack([embed(similarity(f)) for embed, f in zip(self.queries, student, strict=True)], 1)
        # (B, d, n_t)
        k = torch.stack(
            [embed(similarity(f.detach())) for embed, f in zip(self.keys, teacher, strict=True)], 2
        )
        return torch.softmax(torch.bmm(q, k) / self.soft, dim=-1)

    def forward(self, student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
        if student[0].shape[0] != self.batch_size:
            raise ValueError(f"SemCKD was built for batches of {self.batch_size}, got {student[0].shape[0]}")
        rows = []
        for regressors, s_i in zip(self.regressors, student, strict=True):
            pairs = []
            for regress, t_j in zip(regressors, teacher, strict=True):
                s, t = match_spatial(s_i, t_j.detach())
                pairs.append(F.mse_loss(regress(s), t, reduction="none").flatten(1).mean(1))  # (B,)
            rows.append(torch.stack(pairs, 1))  # (B, n_t)
        per_pair = torch.stack(rows, 1)  # (B, n_s, n_t)
        return semckd_loss(per_pair, self.attention(student, teacher))
