"""MCM-KD (Pisula & Bozek 2024): fine-tune a MIL patch extractor by masked context modelling with a teacher.

The student sees an s x s window of neighbouring tiles with some tiles painted over, and predicts, for
every tile, the feature a larger frozen teacher computed for that tile on its own. The teacher's
features come from a cache (`histodistill.features.teacher_cache`), so no teacher runs here. After
fine-tuning, ``self.backbone`` (the student) is used as an ordinary per-patch extractor; the head and
the fill token are dropped. Paper <-> config <-> code: docs/mcmkd.md.
"""

from __future__ import annotations

from typing import Literal

import torch

from histodistill.errors import ConfigError
from histodistill.losses.masked_context import LossKind, TargetNorm, masked_context_loss
from histodistill.methods.base import MethodModule
from histodistill.models.backbones import create_backbone
from histodistill.models.cell_mask import CellMasker, grid_side, random_cell_mask
from histodistill.models.grid_head import GridHead, grid_pool, spatial_features
from histodistill.optim.optimizer import OptimConfig


def mcmkd_optim() -> OptimConfig:
    """The default schedule: AdamW at 1e-4, 5 % warm-up, cosine to 0 (one epoch, set in the recipes)."""
    return OptimConfig(name="adamw", lr=1e-4, warmup_fraction=0.05, min_lr=0.0)


class MCMKD(MethodModule):
    """Masked context modelling with knowledge distillation.

    Args:
        student: backbone name for `create_backbone` (e.g. ``resnet50``, ``tiny/resnet18-64``).
        teacher_dim: the dimension of the cached teacher features (1024 for UNI); checked against the cache.
        pretrained: start the student from its published (ImageNet) weights (needs the hub or timm's cache).
        student_weights: a local weights file for the student instead (safetensors or .pth).
        mask_ratio: fraction of a window's cells hidden from the student (at least one, never all):
            ``round(mask_ratio · s²)`` cells, 4 of 9 at 0.5 (an effective ratio of 0.44).
        mask_count: hide exactly this many cells per window instead (e.g. 5 of 9); None uses ``mask_ratio``.
        fill: what masked cells are painted with: ``mean`` (0 after normalisation) or a ``learned`` RGB value.
        head: per-cell projection to the teacher's dimension, shared by all cells: ``linear`` or ``mlp``.
        head_hidden_dim: hidden width of the ``mlp`` head (default: the student's feature dimension).
        loss: ``cosine`` (1 - cos), ``smooth_l1`` or ``mse`` against the normalised teacher feature.
        target_norm: how teacher features become targets: ``layer_norm`` per tile (default), or
            ``standardize`` per dimension with the mean and std of the teacher cache's tiles, computed once
            by the data module (`set_target_statistics`) and kept in the checkpoint (buffers ``target_mean``,
            ``target_std``). See `histodistill.losses.masked_context`.
        w_masked: weight of the masked-cell term (context modelling).
        w_visible: weight of the visible-cell term (plain feature distillation).
        smooth_l1_beta: the smooth-L1 transition point.
        freeze_bn_stats: keep the student's BatchNorm running statistics as they were (BatchNorm in eval
            mode during training; its affine weights still train). Otherwise they are updated on painted
            windows, then used on single tiles at extraction.
        optim: optimiser and schedule (default AdamW, lr 1e-4, 5 % warm-up, cosine to 0).
    """

    def __init__(
        self,
        student: str,
        teacher_dim: int,
        pretrained: bool = True,
        student_weights: str | None = None,
        mask_ratio: float = 0.5,
        mask_count: int | None = None,
        fill: Literal["mean", "learned"] = "mean",
        head: Literal["linear", "mlp"] = "linear",
        head_hidden_dim: int | None = None,
        loss: LossKind = "cosine",
        w_masked: float = 1.0,
        w_visible: float = 1.0,
        smooth_l1_beta: float = 1.0,
        target_norm: TargetNorm = "layer_norm",
        freeze_bn_stats: bool = False,
        optim: OptimConfig | None = None,
    ) -> None:
        super().__init__(optim or mcmkd_optim())
        if not 0 <= mask_ratio <= 1:
            raise ConfigError(f"`mask_ratio={mask_ratio}`: must be in [0, 1]")
        self.backbone = create_backbone(student, pretrained=pretrained, weights=student_weights)
        self.teacher_dim = teacher_dim
        if mask_count is not None and mask_count < 1:
            raise ConfigError(f"`mask_count={mask_count}`: must be >= 1")
        self.mask_ratio, self.mask_count = mask_ratio, mask_count
        self.freeze_bn_stats = freeze_bn_stats
        self.masker = CellMasker(fill=fill)
        self.head = GridHead(self.backbone.num_features, teacher_dim, kind=head, hidden_dim=head_hidden_dim)
        self.loss_kind = loss
        self.w_masked, self.w_visible, self.smooth_l1_beta = w_masked, w_visible, smooth_l1_beta
        if target_norm not in ("layer_norm", "standardize"):
            raise ConfigError(f"`target_norm={target_norm!r}`: must be 'layer_norm' or 'standardize'")
        self.target_norm = target_norm
        if target_norm == "standardize":
            # Registered only here, so checkpoints of layer_norm runs keep their keys. NaN until
            # set_target_statistics: a run that never got its statistics fails loudly instead of training.
            self.register_buffer("target_mean", torch.full((teacher_dim,), float("nan")))
            self.register_buffer("target_std", torch.full((teacher_dim,), float("nan")))
        else:
            self.target_mean = self.target_std = None

    def set_target_statistics(self, mean, std) -> None:
        """The per-dimension mean and std (D,) of the teacher cache's features, for ``standardize``."""
        if self.target_norm != "standardize":
            raise ValueError(
                f"target statistics are only used with target_norm 'standardize', not {self.target_norm!r}"
            )
        mean, std = torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32)
        if mean.shape != (self.teacher_dim,) or std.shape != (self.teacher_dim,):
            raise ValueError(
                f"target statistics must have shape ({self.teacher_dim},), got {tuple(mean.shape)} "
                f"and {tuple(std.shape)}"
            )
        self.target_mean.copy_(mean)
        self.target_std.copy_(std)

    def train(self, mode: bool = True) -> MCMKD:
        """Training mode, except that frozen statistics keep the student's BatchNorm layers in eval mode
        (normalising with, and not updating, their running statistics)."""
        super().train(mode)
        if mode and self.freeze_bn_stats:
            for module in self.backbone.modules():
                if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def on_train_epoch_start(self) -> None:
        # Lightning never calls train() when fitting starts (the module is built in training mode), so the
        # BatchNorm switch is applied here, every epoch.
        self.train()

    def predict_cells(self, windows: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        """(B, 3, P, P) normalised windows + (B, s*s) mask -> (B, s*s, teacher_dim) predicted teacher
        features."""
        hidden = self.masker(windows, masked)  # masked cells painted with the fill
        cells = grid_pool(spatial_features(self.backbone, hidden), grid_side(masked.shape[1]))  # (B, s*s, C)
        return self.head(cells)

    def objective(self, batch) -> dict[str, torch.Tensor]:
        windows, _cell_coords, valid, teacher = batch  # (B, 3, P, P), (B, S, 2), (B, S), (B, S, D)
        masked = random_cell_mask(
            valid.shape[0], valid.shape[1], self.mask_ratio, device=windows.device, count=self.mask_count
        )
        pred = self.predict_cells(windows, masked)
        if self.target_norm == "standardize" and torch.isnan(self.target_mean).any():
            raise RuntimeError(
                "target_norm 'standardize' needs the teacher cache's statistics: the data module "
                "(ContextWindowDataModule) sets them in setup(); call set_target_statistics first"
            )
        return masked_context_loss(
            pred,
            teacher,
            masked,
            valid,
            self.loss_kind,
            self.w_masked,
            self.w_visible,
            self.smooth_l1_beta,
            self.target_norm,
            self.target_mean,
            self.target_std,
        )
