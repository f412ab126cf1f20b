"""Contrastive representation distillation (Tian, Krishnan, Isola 2020) with its memory bank.

Student and teacher pooled features are embedded (Linear -> L2) into a common space. Two memory
banks keep one slowly-updated embedding per training sample: one of student embeddings, one of
teacher embeddings. For each sample, the teacher embedding is contrasted against the student
memory at the sample's own index (positive) and at ``nce_k`` random indices (negatives), and
symmetrically; the NCE loss estimates the critic ``h = P(positive | pair)`` against a uniform noise
distribution ``P_n = 1 / N``:

    h(x) = x / (x + k · P_n),   x = exp(v · m / τ) / Z
    L = −Σ_batch [ log h(x_pos) + Σ_negatives log(1 − h(x_neg)) ] / B      (for each of the two sides)

``Z`` is a constant estimated once from the first batch (``mean(exp(.)) · N``), as in the paper's
code. Memories start as uniform noise and are updated as ``m ← normalise(μ · m + (1 − μ) · v)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from histodistill.losses.infonce import concat_all_gather
from histodistill.models.projection import ProjectionHead

EPS = 1e-7


def nce_loss(scores: torch.Tensor, num_data: int) -> torch.Tensor:
    """scores (B, 1 + k): normalised exp-similarities, positive in column 0 -> scalar NCE loss."""
    k = scores.shape[1] - 1
    noise = k / num_data  # k · P_n
    log_h_pos = torch.log(scores[:, 0] / (scores[:, 0] + noise + EPS))  # (B,)
    log_1_minus_h_neg = torch.log(noise / (scores[:, 1:] + noise + EPS))  # (B, k)
    return -(log_h_pos.sum() + log_1_minus_h_neg.sum()) / scores.shape[0]


class ContrastMemory(nn.Module):
    """Two memory banks (N, D) and the normalisation constants of CRD.

    ``Z`` stays ``-1`` until the first batch sets it; it is a buffer so a resumed run keeps it.
    """

    def __init__(self, dim: int, num_data: int, nce_k: int, temperature: float, momentum: float) -> None:
        super().__init__()
        self.num_data, self.nce_k, self.temperature, self.momentum = num_data, nce_k, temperature, momentum
        bound = 1.0 / math.sqrt(dim / 3)  # uniform init with the variance of a unit vector's entries
        self.register_buffer("memory_student", torch.rand(num_data, dim) * 2 * bound - bound)
        self.register_buffer("memory_teacher", torch.rand(num_data, dim) * 2 * bound - bound)
        self.register_buffer("z_student", torch.tensor(-1.0))
        self.register_buffer("z_teacher", torch.tensor(-1.0))

    def sample_indices(self, index: torch.Tensor) -> torch.Tensor:
        """index (B,) -> (B, 1 + k): the sample's own index, then k uniform random indices."""
        negatives = torch.randint(0, self.num_data, (index.shape[0], self.nce_k), device=index.device)
        return torch.cat([index[:, None], negatives], dim=1)

    def scores(
        self, anchor: torch.Tensor, memory: torch.Tensor, contrast_index: torch.Tensor, z: torch.Tensor
    ):
        """anchor (B, D) against memory rows contrast_index (B, 1 + k) -> normalised scores (B, 1 + k)."""
        rows = memory[contrast_index].detach()  # (B, 1 + k, D)
        scores = torch.exp(torch.bmm(rows, anchor.unsqueeze(2)).squeeze(2) / self.temperature)
        if z < 0:
            # Same constant on every rank: estimated from the mean over all ranks' first batch.
            z.fill_(concat_all_gather(scores.mean().detach().reshape(1)).mean().item() * self.num_data)
        return scores / z

    @torch.no_grad()
    def update(self, student: torch.Tensor, teacher: torch.Tensor, index: torch.Tensor) -> None:
        """Move each sample's memory rows towards its new embeddings (gathered over ranks under DDP)."""
        index, student, teacher = (
            concat_all_gather(index),
            concat_all_gather(student),
            concat_all_gather(teacher),
        )
        for memory, value in ((self.memory_student, student), (self.memory_teacher, teacher)):
            blended = memory[index] * self.momentum + value.to(memory.dtype) * (1 - self.momentum)
            memory[index] = F.normalize(blended, dim=1)


class CRDLoss(nn.Module):
    """The CRD feature term: embeddings, memory, NCE on both sides.

    forward(student_features (B, Ds), teacher_features (B, Dt), index (B,)) -> scalar; then the
    memory is updated with this batch. ``contrast_index`` may be given (B, 1 + k) for reproducible tests.
    """

    def __init__(
        self,
        student_dim: int,
        teacher_dim: int,
        num_data: int,
        feat_dim: int = 128,
        nce_k: int = 16384,
        temperature: float = 0.07,
        momentum: float = 0.5,
    ) -> None:
        super().__init__()
        self.embed_student = ProjectionHead(student_dim, feat_dim, hidden_dim=0)
        self.embed_teacher = ProjectionHead(teacher_dim, feat_dim, hidden_dim=0)
        self.memory = ContrastMemory(feat_dim, num_data, nce_k, temperature, momentum)

    def forward(
        self,
        student_features: torch.Tensor,
        teacher_features: torch.Tensor,
        index: torch.Tensor,
        contrast_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        v_student = self.embed_student(student_features)  # (B, feat_dim)
        v_teacher = self.embed_teacher(teacher_features.detach())  # (B, feat_dim)
        if contrast_index is None:
            contrast_index = self.memory.sample_indices(index)
        memory = self.memory
        # Teacher anchor against student memory, and student anchor against teacher memory.
        scores_teacher = memory.scores(v_teacher, memory.memory_student, contrast_index, memory.z_teacher)
        scores_student = memory.scores(v_student, memory.memory_teacher, contrast_index, memory.z_student)
        loss = nce_loss(scores_teacher, memory.num_data) + nce_loss(scores_student, memory.num_data)
        memory.update(v_student.detach(), v_teacher.detach(), index)
        return loss
