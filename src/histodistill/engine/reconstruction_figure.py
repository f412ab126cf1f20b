"""A Lightning callback that draws original / masked / reconstructed patches during masked pretraining.

It keeps the first images of the first training batch and, every ``every_n_steps`` optimiser steps
and once at the end of training, asks the module for ``reconstruction_preview(images, generator)``
(see `histodistill.methods.sdmae`) with the same seeded masks each time, so successive figures show
the same patches getting sharper. PNGs go to ``<run dir>/figures/reconstruction_step<N>.png`` and
``reconstruction_final.png``.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from histodistill.errors import ConfigError
from histodistill.io import atomic_path  # noqa: E402

COLUMNS = ("original", "masked", "reconstruction")


def save_reconstruction_grid(preview: dict[str, torch.Tensor], path: str | Path, title: str = "") -> Path:
    """One row per image, columns original / masked / reconstruction; tensors (N, 3, H, W) in [0, 1]."""
    n = preview["original"].shape[0]
    fig, axes = plt.subplots(n, len(COLUMNS), figsize=(2 * len(COLUMNS), 2 * n), squeeze=False)
    for row in range(n):
        for col, name in enumerate(COLUMNS):
            ax = axes[row][col]
            ax.imshow(
                preview[name][row].permute(1, 2, 0).float().cpu().clamp(0, 1).numpy(), interpolation="nearest"
            )
            ax.set_axis_off()
            if row == 0:
                ax.set_title(name, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return Path(path)


class ReconstructionFigure(L.Callback):
    """Args:
    every_n_steps: write a figure every this many optimiser steps (0: only at the end).
    num_images: how many images of the first training batch to show (rows of the grid).
    seed: seed of the masks drawn for the figure (the same masks in every figure).
    """

    def __init__(self, every_n_steps: int = 1000, num_images: int = 8, seed: int = 0) -> None:
        if every_n_steps < 0 or num_images < 1:
            raise ConfigError("ReconstructionFigure needs every_n_steps >= 0 and num_images >= 1")
        self.every_n_steps = every_n_steps
        self.num_images = num_images
        self.seed = seed
        self._images: torch.Tensor | None = None
        self._last_step = -1

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int
    ) -> None:
        if self._images is None:
            self._images = batch[0][: self.num_images].detach().cpu().clone()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0 and step != self._last_step:
            self._last_step = step
            self.write(trainer, pl_module, f"reconstruction_step{step:07d}.png", f"step {step}")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.write(
            trainer, pl_module, "reconstruction_final.png", f"end of training (step {trainer.global_step})"
        )

    def write(
        self, trainer: L.Trainer, pl_module: L.LightningModule, filename: str, title: str
    ) -> Path | None:
        if self._images is None or not trainer.is_global_zero:
            return None
        was_training = pl_module.training
        pl_module.eval()  # no dropout, and the distillation centre is left untouched
        try:
            preview = pl_module.reconstruction_preview(
                self._images.to(pl_module.device), generator=torch.Generator().manual_seed(self.seed)
            )
        finally:
            pl_module.train(was_training)
        return save_reconstruction_grid(preview, Path(trainer.default_root_dir) / "figures" / filename, title)
