"""The supervised baseline: a classifier trained with cross-entropy on labeled patches (MoMA's
"vanilla" student, and the reference every distillation method must beat)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from histodistill.errors import UserError
from histodistill.methods.classification import ClassificationMethod
from histodistill.optim.optimizer import OptimConfig


class Supervised(ClassificationMethod):
    """Cross-entropy on ``(images (B, 3, S, S), labels (B,))`` batches.

    Args:
        label_smoothing: mass spread uniformly over all classes in the CE target (0 = plain CE).
        Others: see `ClassificationMethod`.
    """

    def __init__(
        self,
        backbone: str,
        num_classes: int,
        backbone_kwargs: dict[str, Any] | None = None,
        pretrained: bool = True,
        weights: str | None = None,
        optim: OptimConfig | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(backbone, num_classes, backbone_kwargs, pretrained, weights, optim)
        if not 0.0 <= label_smoothing < 1.0:
            raise UserError(f"model.init_args.label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = label_smoothing

    def objective(self, batch: Any) -> dict[str, torch.Tensor]:
        images, labels = batch[0], batch[1]
        loss = F.cross_entropy(self(images), labels, label_smoothing=self.label_smoothing)
        return {"loss": loss}
