"""Callbacks every `histodistill fit` run gets: per-epoch reseeding (exact resume) and the run summary
(``metrics.json``)."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from histodistill.io import write_json


class EpochReseed(L.Callback):
    """Reseed Python, NumPy and torch at the start of every training epoch from (seed, epoch, rank).

    Augmentations, dropout and drop-path draw from these generators. Without reseeding, a run
    resumed at epoch ``e`` would start epoch ``e`` from a different generator state than an
    uninterrupted run (the checkpoint does not hold it), so the two would diverge. With it,
    epoch ``e`` is the same in both, as long as DataLoader workers are re-created each epoch or
    absent (``num_workers: 0``; persistent workers keep their own stream across epochs).
    """

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        seed = self.seed if self.seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))
        state = np.random.SeedSequence([seed, trainer.current_epoch, trainer.global_rank]).generate_state(1)
        value = int(state[0])
        random.seed(value)
        np.random.seed(value)
        torch.manual_seed(value)  # seeds every CUDA device too


class RunSummary(L.Callback):
    """Write ``<run dir>/metrics.json`` when fitting (and testing) ends: the last logged value of every
    metric, the best value and checkpoint of every monitored metric, epochs and steps completed."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.path = Path(run_dir) / "metrics.json"
        self.summary: dict[str, Any] = {}

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        best = {}
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.monitor and callback.best_model_path:
                best[callback.monitor] = {
                    "mode": callback.mode,
                    "value": _number(callback.best_model_score),
                    "checkpoint": callback.best_model_path,
                }
        self.summary.update(
            epochs=trainer.current_epoch,
            global_step=trainer.global_step,
            final=_numbers(trainer.callback_metrics),
            best=best,
        )
        self._write(trainer)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.summary["test"] = {k: v for k, v in _numbers(trainer.callback_metrics).items() if k.startswith("test/")}
        self._write(trainer)

    def _write(self, trainer: L.Trainer) -> None:
        if trainer.is_global_zero:
            write_json(self.path, self.summary)


def _number(value: Any) -> float | None:
    """A plain float, or None for a missing or NaN value (JSON has no NaN)."""
    if value is None:
        return None
    number = float(value.item() if isinstance(value, torch.Tensor) else value)
    return None if number != number else number


def _numbers(metrics: dict[str, Any]) -> dict[str, float | None]:
    return {name: _number(value) for name, value in sorted(metrics.items())}
