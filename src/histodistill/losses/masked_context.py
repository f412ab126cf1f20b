"""The MCM-KD objective: predict the teacher's feature of every tile of a window, masked or not.

Per cell, the student's projected feature is compared with the teacher's feature of that tile,
LayerNorm-ed without affine parameters (as masked-feature-prediction methods normalise their
targets, so the loss does not depend on the teacher's feature scale). Masked cells (predicted from
context) and visible cells (plain feature distillation) are averaged separately and weighted;
cells that are not tissue tiles have no teacher feature and are left out.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

LossKind = Literal["cosine", "smooth_l1"]


def normalise_targets(teacher: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm without affine over the feature dimension: (..., D) -> (..., D), zero mean, unit variance."""
    return F.layer_norm(teacher.float(), teacher.shape[-1:], eps=eps)


def per_cell_loss(pred: torch.Tensor, target: torch.Tensor, kind: LossKind, beta: float = 1.0) -> torch.Tensor:
    """(B, S, D) x (B, S, D) -> (B, S): ``1 - cos`` or the smooth-L1 averaged over the D features."""
    if kind == "cosine":
        return 1.0 - F.cosine_similarity(pred, target, dim=-1, eps=1e-8)
    if kind == "smooth_l1":
        return F.smooth_l1_loss(pred, target, reduction="none", beta=beta).mean(dim=-1)
    raise ValueError(f"loss kind must be 'cosine' or 'smooth_l1', got {kind!r}")


def _mean_over(values: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` (B, S) over the True cells of ``selected`` (B, S); 0 when none is selected."""
    weights = selected.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp_min(1.0)


def masked_context_loss(
    pred: torch.Tensor,
    teacher: torch.Tensor,
    masked: torch.Tensor,
    valid: torch.Tensor,
    kind: LossKind = "cosine",
    w_masked: float = 1.0,
    w_visible: float = 1.0,
    beta: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Named losses for a batch of windows.

    Args:
        pred: (B, S, D) the student's projected cell features.
        teacher: (B, S, D) the cached teacher features of the same cells (any values where invalid).
        masked: (B, S) bool, True where the cell was hidden from the student.
        valid: (B, S) bool, True where the cell is a tissue tile with a teacher feature.
    Returns:
        ``loss = w_masked * masked + w_visible * visible``, where ``masked`` / ``visible`` are the mean
        per-cell losses over the valid masked / valid visible cells of the whole batch.
    """
    per_cell = per_cell_loss(pred.float(), normalise_targets(teacher), kind, beta)  # (B, S)
    masked_term = _mean_over(per_cell, masked & valid)
    visible_term = _mean_over(per_cell, ~masked & valid)
    total = w_masked * masked_term + w_visible * visible_term
    return {"loss": total, "masked": masked_term, "visible": visible_term}
