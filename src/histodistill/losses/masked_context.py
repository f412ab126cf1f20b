"""The MCM-KD objective: predict the teacher's feature of every tile of a window, masked or not.

Per cell, the student's projected feature is compared with the teacher's feature of that tile after a
normalisation of the targets (``target_norm``):

- ``layer_norm`` (default): LayerNorm without affine parameters, per tile over D (as masked-feature-
  prediction methods normalise their targets), so the loss does not depend on the teacher's scale.
- ``standardize``: per dimension, with the mean and standard deviation of each dimension over the
  teacher cache's tiles (computed once). A per-tile LayerNorm keeps what all tiles share: when one
  direction dominates a teacher's features, the cosine to the LayerNorm-ed target is mostly the cosine to
  that common mean, and a student that outputs it scores well while learning nothing
  (`mean_direction_share` measures it; docs/mcmkd.md). Standardising per dimension removes the common
  mean, so the loss weighs what differs between tiles.

Masked cells (predicted from context) and visible cells (plain feature distillation) are averaged
separately and weighted; cells that are not tissue tiles have no teacher feature and are left out.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from histodistill.errors import ConfigError

LossKind = Literal["cosine", "smooth_l1", "mse"]
TargetNorm = Literal["layer_norm", "standardize"]


def normalise_targets(
    teacher: torch.Tensor,
    norm: TargetNorm = "layer_norm",
    mean: torch.Tensor | None = None,
    std: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """(..., D) teacher features -> (..., D) targets.

    ``layer_norm``: per vector over D, zero mean and unit variance (no affine). ``standardize``:
    ``(t - mean) / max(std, eps)`` per dimension, with ``mean`` and ``std`` (D,) given (statistics over the
    teacher cache, `histodistill.data.teacher_features.feature_statistics`). Raises ValueError for an
    unknown ``norm`` or ``standardize`` without statistics.
    """
    if norm == "layer_norm":
        return F.layer_norm(teacher.float(), teacher.shape[-1:], eps=eps)
    if norm == "standardize":
        if mean is None or std is None:
            raise ValueError(
                "target_norm 'standardize' needs the per-dimension mean and std of the teacher cache"
            )
        return (teacher.float() - mean) / std.clamp_min(eps)
    raise ConfigError(f"target_norm must be 'layer_norm' or 'standardize', got {norm!r}")


def mean_direction_share(targets: torch.Tensor) -> float:
    """The fraction of the targets' energy along their common mean direction: for (N, D) targets t_i with
    mean m, ``sum_i (t_i · m/|m|)² / sum_i |t_i|²``. 1 when every target points the same way; about 1/D for
    isotropic targets around 0. A predictor that always outputs m gets a mean cosine of about the square
    root of it, without looking at the input."""
    targets = targets.double()
    mean = targets.mean(dim=0)
    if mean.norm() == 0:
        return 0.0
    along = targets @ (mean / mean.norm())  # (N,)
    return float((along**2).sum() / (targets**2).sum())


def per_cell_loss(
    pred: torch.Tensor, target: torch.Tensor, kind: LossKind, beta: float = 1.0
) -> torch.Tensor:
    """(B, S, D) x (B, S, D) -> (B, S): ``1 - cos``, or the smooth-L1 or squared error averaged over the D
    features."""
    if kind == "cosine":
        return 1.0 - F.cosine_similarity(pred, target, dim=-1, eps=1e-8)
    if kind == "smooth_l1":
        return F.smooth_l1_loss(pred, target, reduction="none", beta=beta).mean(dim=-1)
    if kind == "mse":
        return F.mse_loss(pred, target, reduction="none").mean(dim=-1)
    raise ConfigError(f"loss kind must be 'cosine', 'smooth_l1' or 'mse', got {kind!r}")


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
    target_norm: TargetNorm = "layer_norm",
    target_mean: torch.Tensor | None = None,
    target_std: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Named losses for a batch of windows.

    Args:
        pred: (B, S, D) the student's projected cell features.
        teacher: (B, S, D) the cached teacher features of the same cells (any values where invalid).
        masked: (B, S) bool, True where the cell was hidden from the student.
        valid: (B, S) bool, True where the cell is a tissue tile with a teacher feature.
        target_norm, target_mean, target_std: how targets are normalised (`normalise_targets`).
    Returns:
        ``loss = w_masked * masked + w_visible * visible``, where ``masked`` / ``visible`` are the mean
        per-cell losses over the valid masked / valid visible cells of the whole batch.
    """
    target = normalise_targets(teacher, target_norm, target_mean, target_std)
    per_cell = per_cell_loss(pred.float(), target, kind, beta)  # (B, S)
    masked_term = _mean_over(per_cell, masked & valid)
    visible_term = _mean_over(per_cell, ~masked & valid)
    total = w_masked * masked_term + w_visible * visible_term
    return {"loss": total, "masked": masked_term, "visible": visible_term}
