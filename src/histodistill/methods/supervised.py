"""The supervised baseline: a classifier trained with cross-entropy on labeled patches (MoMA's
"vanilla" student, and the reference every distillation method must beat), and the fine-tuning recipe
of MAE / SD-MAE (``configs/sdmae/finetune_*.yaml``): a pretrained encoder as ``backbone``, layer-wise lr
decay in ``optim``, drop-path in ``backbone_kwargs``, and timm's Mixup/CutMix with label smoothing here."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy

from histodistill.errors import ConfigError, UserError
from histodistill.methods.classification import ClassificationMethod
from histodistill.optim.optimizer import OptimConfig


class Supervised(ClassificationMethod):
    """Cross-entropy on ``(images (B, 3, S, S), labels (B,))`` batches.

    Args:
        label_smoothing: mass spread uniformly over all classes in the CE target (0 = plain CE).
        mixup, cutmix: Beta(α, α) parameters of timm's `Mixup` (MAE/SD-MAE fine-tuning: 0.8 and 1.0; 0 = off).
            With either on, each training batch is mixed (``mixup_prob`` of the batches, switching between
            the two with ``mixup_switch_prob``; the batch size must be even) and the loss is timm's
            `SoftTargetCrossEntropy` on the mixed, label-smoothed targets.
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
        mixup: float = 0.0,
        cutmix: float = 0.0,
        mixup_prob: float = 1.0,
        mixup_switch_prob: float = 0.5,
    ) -> None:
        super().__init__(backbone, num_classes, backbone_kwargs, pretrained, weights, optim)
        if not 0.0 <= label_smoothing < 1.0:
            raise ConfigError(f"`label_smoothing={label_smoothing}`: must be in [0, 1)")
        if mixup < 0 or cutmix < 0:
            raise ConfigError(f"`mixup={mixup}` and `cutmix={cutmix}`: must be >= 0")
        self.label_smoothing = label_smoothing
        self.mixup: Mixup | None = None
        if mixup > 0 or cutmix > 0:
            self.mixup = Mixup(
                mixup_alpha=mixup,
                cutmix_alpha=cutmix,
                prob=mixup_prob,
                switch_prob=mixup_switch_prob,
                mode="batch",
                label_smoothing=label_smoothing,
                num_classes=num_classes,
            )
            self.soft_target_loss = SoftTargetCrossEntropy()

    def objective(self, batch: Any) -> dict[str, torch.Tensor]:
        images, labels = batch[0], batch[1]
        if self.mixup is not None and self.training:
            if images.shape[0] % 2:
                raise UserError(
                    f"mixup/cutmix mix a batch with its reverse and need an even batch size, got "
                    f"{images.shape[0]}: set `batch_size=...` to an even number"
                )
            images, targets = self.mixup(images, labels)  # targets (B, C): mixed, smoothed one-hots
            return {"loss": self.soft_target_loss(self(images), targets)}
        loss = F.cross_entropy(self(images), labels, label_smoothing=self.label_smoothing)
        return {"loss": loss}
