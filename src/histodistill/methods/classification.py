"""`ClassificationMethod`: the base of every method whose student is a classifier (supervised, KD
baselines, MoMA). It owns the student (backbone + linear classifier), validation/test metrics and
the confusion figures; subclasses only write `objective`.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.fabric.utilities.warnings import PossibleUserWarning
from torch import nn
from torch.utils.data import DistributedSampler

from histodistill.errors import ConfigError
from histodistill.eval.metrics import classification_metrics, plot_confusion
from histodistill.methods.base import MethodModule
from histodistill.models.backbones import create_backbone
from histodistill.optim.optimizer import OptimConfig


class ClassificationMethod(MethodModule):
    """A backbone and a linear classifier on its pooled features, evaluated with the five
    classification metrics.

    Args:
        backbone: a backbone name for `histodistill.models.backbones.create_backbone` (registered name,
            timm name, ``hf-hub:`` id, checkpoint of ours or exported directory).
        num_classes: number of classes; must equal the number of classes in the training data.
        backbone_kwargs: extra constructor arguments for the backbone (e.g. ``drop_path_rate``, ``img_size``).
        pretrained: start from the backbone's published weights (timm / hf-hub, from the Hugging Face
            cache or hub; a run that cannot get them stops with an error). False: random initialisation.
        weights: a local weights file for the backbone (safetensors, .pth/.pt), or None.
        optim: optimiser and schedule.
    """

    # Keep one checkpoint for the best validation accuracy and one for the best macro-F1 (MoMA does).
    checkpoint_monitors = {"accuracy": ("val/accuracy", "max"), "macro_f1": ("val/macro_f1", "max")}

    def __init__(
        self,
        backbone: str,
        num_classes: int,
        backbone_kwargs: dict[str, Any] | None = None,
        pretrained: bool = True,
        weights: str | None = None,
        optim: OptimConfig | None = None,
    ) -> None:
        super().__init__(optim)
        if num_classes < 2:
            raise ConfigError(f"`num_classes={num_classes}`: must be >= 2")
        self.num_classes = num_classes
        self.backbone = create_backbone(
            backbone, pretrained=pretrained, weights=weights, **(backbone_kwargs or {})
        )
        self.classifier = nn.Linear(self.backbone.num_features, num_classes)
        self._logits: list[torch.Tensor] = []
        self._targets: list[torch.Tensor] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, S, S) → logits (B, num_classes)."""
        return self.classifier(self.backbone(images))

    @property
    def class_names(self) -> list[str]:
        names = getattr(getattr(self._trainer, "datamodule", None), "classes", None)
        return list(names) if names else [str(i) for i in range(self.num_classes)]

    def setup(self, stage: str) -> None:
        names = getattr(getattr(self.trainer, "datamodule", None), "classes", None)
        if names is not None and len(names) != self.num_classes:
            raise ConfigError(
                f"`num_classes={self.num_classes}` but the training data has {len(names)} "
                f"classes ({', '.join(map(str, names))}): set `num_classes={len(names)}`"
            )

    # ---- validation and test: collect logits, score them once per epoch ------------------------
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._collect(batch)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._collect(batch)

    def on_validation_epoch_start(self) -> None:
        self._logits, self._targets = [], []

    on_test_epoch_start = on_validation_epoch_start

    def on_validation_epoch_end(self) -> None:
        self._report("val")

    def on_test_epoch_end(self) -> None:
        self._report("test")

    def _collect(self, batch: Any) -> None:
        images, targets = batch[0], batch[1]
        self._logits.append(self(images).float())
        self._targets.append(targets)

    def _gather_ranks(self, logits: torch.Tensor, targets: torch.Tensor, stage: str):
        """(N_rank, C), (N_rank,) on each rank -> every rank's, each sample once where the sampler allows.

        Lightning's evaluation sampler (`DistributedSampler`, no shuffle) gives rank r the samples r, r + W,
        r + 2W, ... of the set padded with its first samples to a multiple of W. Interleaving the gathered
        ranks restores the set's order, and cutting at its length drops the padding, which would otherwise
        count a few samples twice. Any other sampler: all gathered predictions, as they come.
        """
        logits, targets = self.all_gather(logits), self.all_gather(targets)  # (W, N_rank, C), (W, N_rank)
        loader = self.trainer.val_dataloaders if stage == "val" else self.trainer.test_dataloaders
        sampler = getattr(loader, "sampler", None)
        if isinstance(sampler, DistributedSampler) and not sampler.shuffle and not sampler.drop_last:
            total = len(sampler.dataset)
            # (W, N_rank, ...) -> (N_rank, W, ...) -> (N_rank * W, ...): the padded set in order.
            return logits.transpose(0, 1).flatten(0, 1)[:total], targets.transpose(0, 1).flatten(0, 1)[:total]
        return logits.flatten(0, 1), targets.flatten(0, 1)

    def _report(self, stage: str) -> None:
        if not self._logits:
            return
        logits = torch.cat(self._logits)  # (N, C)
        targets = torch.cat(self._targets)  # (N,)
        self._logits, self._targets = [], []
        if self.trainer.world_size > 1:
            # Every rank scores the whole set, so all log the same numbers.
            logits, targets = self._gather_ranks(logits, targets, stage)
            # So Lightning's advice to reduce these epoch metrics across devices (sync_dist) does not apply to
            # them; it still shows for any other metric. Set here, not at import: `fit` imports this module
            # inside a `warnings.catch_warnings()` block, which would discard the filter on exit.
            warnings.filterwarnings(
                "ignore",
                message=rf"It is recommended to use `self\.log\('{stage}/",
                category=PossibleUserWarning,
            )
        loss = F.cross_entropy(logits, targets)
        probs = logits.softmax(dim=1).cpu().numpy()
        metrics = classification_metrics(targets.cpu().numpy(), probs, self.num_classes)
        self.log(f"{stage}/loss", loss, sync_dist=False)
        self.log_dict({f"{stage}/{name}": value for name, value in metrics.items()}, sync_dist=False)
        if self.trainer.is_global_zero and not self.trainer.sanity_checking:
            path = Path(self.trainer.default_root_dir) / "figures" / f"{stage}_confusion.png"
            title = f"{stage} epoch {self.current_epoch}: accuracy {metrics['accuracy']:.3f}"
            plot_confusion(targets.cpu().numpy(), probs.argmax(axis=1), self.class_names, path, title=title)
