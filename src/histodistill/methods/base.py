"""The base every method builds on: an objective that returns named losses, and one way to train it.

A method subclasses `MethodModule` and implements ``objective(batch) -> dict[str, Tensor]`` whose
``"loss"`` entry is the weighted total that gets back-propagated; every other entry is logged as
``train/<name>``. The base owns what is the same for every method: the optimiser and its per-step
warm-up + cosine schedule, weight-decay groups, the stop on a non-finite loss, and the description
of the extractable backbone that `histodistill export` and `extract` read from a checkpoint.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import torch

from histodistill.errors import UserError
from histodistill.models.backbones import CHECKPOINT_BACKBONE_KEY
from histodistill.optim.optimizer import OptimConfig, build_optimizer, build_scheduler, scaled_lr
from histodistill.optim.overflow import step_overflowed


class NonFiniteLossError(UserError):
    """The loss became NaN or infinite: training stops before the bad step touches the weights."""


class MethodModule(L.LightningModule):
    """Base LightningModule. Subclasses set ``self.backbone`` (a `histodistill.models.backbones.Backbone`,
    the network users extract features with) and implement `objective`."""

    backbone: torch.nn.Module

    # Metrics worth a "best" checkpoint, as {name: (logged metric, "max" | "min")}: `histodistill fit`
    # keeps checkpoints/best-<name>.ckpt for each (besides last.ckpt). Classification methods monitor
    # validation accuracy and macro-F1; methods without validation keep only last.ckpt.
    checkpoint_monitors: dict[str, tuple[str, str]] = {}

    def __init__(self, optim: OptimConfig | None = None) -> None:
        super().__init__()
        self.optim = optim or OptimConfig()

    # ---- what a method implements -------------------------------------------------------------
    def objective(self, batch: Any) -> dict[str, torch.Tensor]:
        """Named losses for one batch; ``"loss"`` is the total to back-propagate."""
        raise NotImplementedError

    @property
    def preprocess(self):
        """Mean, std, input size and mpp the data must be prepared with (the backbone's)."""
        return self.backbone.spec.preprocess

    # ---- training -------------------------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        losses = self.objective(batch)
        total = losses["loss"]
        if not torch.isfinite(total):
            # Raising before backward() keeps the weights as they were after the last good step.
            details = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
            raise NonFiniteLossError(
                f"the training loss became non-finite at step {self.global_step} ({details}). "
                f"{self._resume_hint()} Lower optim.lr, raise the warm-up, or use precision 32 to find the "
                "cause."
            )
        batch_size = _batch_size(batch)
        for name, value in losses.items():
            self.log(
                f"train/{name}",
                value.detach(),
                prog_bar=name == "loss",
                batch_size=batch_size,
                sync_dist=False,
            )
        return total

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        try:
            super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        except RuntimeError as error:
            if not step_overflowed(error):
                raise
            lr = optimizer.param_groups[0]["lr"]
            raise NonFiniteLossError(
                f"the optimiser step overflowed at step {self.global_step} (learning rate {lr:.4g}: "
                f"{error}). {self._resume_hint()} Lower optim.lr."
            ) from None

    def _resume_hint(self) -> str:
        """Which checkpoint a stopped run can go back to: only one that exists on disk is named."""
        trainer = self.trainer
        paths = {getattr(c, "best_model_path", "") for c in trainer.checkpoint_callbacks} | {
            trainer.ckpt_path or ""
        }
        saved = sorted(str(p) for p in paths if p and Path(p).is_file())
        if saved:
            return f"The checkpoint(s) on disk ({', '.join(saved)}) are from before this step."
        return "No checkpoint was written before this step, so there is nothing to resume from."

    def configure_optimizers(self):
        trainer = self.trainer
        total_steps = max(1, int(trainer.estimated_stepping_batches))
        epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else 1
        steps_per_epoch = max(1, math.ceil(total_steps / epochs))
        lr = scaled_lr(self.optim, self.effective_batch_size())
        optimizer = build_optimizer(self, self.optim, lr)
        scheduler = build_scheduler(optimizer, self.optim, lr, total_steps, steps_per_epoch)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def effective_batch_size(self) -> int:
        """Samples per optimiser step across all devices and accumulation steps."""
        trainer = self.trainer
        datamodule = getattr(trainer, "datamodule", None)
        per_device = getattr(datamodule, "batch_size", None) or 1
        return int(per_device) * trainer.accumulate_grad_batches * trainer.world_size

    # ---- checkpoints ----------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_BACKBONE_KEY] = backbone_record(self)


def backbone_record(module: MethodModule) -> dict[str, Any]:
    """What a checkpoint needs to rebuild its backbone without the method's code: the backbone's
    spec (timm name, constructor kwargs, preprocessing) and the prefix of its weights in the
    module's state dict."""
    for name, child in module.named_modules():
        if child is module.backbone:
            return {"spec": module.backbone.spec.to_dict(), "state_dict_prefix": f"{name}.model."}
    raise RuntimeError("the method's backbone is not one of its submodules")


def _batch_size(batch: Any) -> int:
    first = (
        batch[0]
        if isinstance(batch, (list, tuple))
        else next(iter(batch.values()))
        if isinstance(batch, dict)
        else batch
    )
    return int(first.shape[0]) if hasattr(first, "shape") else 1
