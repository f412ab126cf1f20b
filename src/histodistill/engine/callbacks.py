"""Callbacks every `histodistill fit` run gets: per-epoch reseeding (exact resume) and the run summary
(``metrics.json``)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info

from histodistill.io import atomic_path, write_json


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary file and renamed: a job killed while saving leaves the
    previous ``last.ckpt`` intact instead of a truncated one that resuming would choke on."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)


class StepReseed(L.Callback):
    """Reseed Python, NumPy and torch before every training batch from (seed, epoch, batch, rank).

    Dropout, drop-path and random masking draw from these generators. The checkpoint does not hold
    their state, and Lightning draws from them a different number of times in a resumed run (e.g.
    when it creates DataLoader iterators), so without reseeding a resumed run would diverge from an
    uninterrupted one. (Augmentations have their own per-sample seeds: see `PatchDataModule`.)
    """

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        seed = self.seed if self.seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))
        key = [seed, trainer.current_epoch, batch_idx, trainer.global_rank]
        state = np.random.SeedSequence(key).generate_state(1)
        value = int(state[0])
        random.seed(value)
        np.random.seed(value)
        torch.manual_seed(value)  # seeds every CUDA device too


class RunSummary(L.Callback):
    """Write ``<run dir>/metrics.json`` when fitting (and testing) ends: the last logged value of every
    metric, the best value and checkpoint of every monitored metric, epochs and steps completed.

    A fit that trains no batch (``--resume`` of a finished run) keeps the metrics.json the run ended with:
    it has no metrics of its own to write, and rewriting it left ``final`` empty and ``best`` wrong."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.path = Path(run_dir) / "metrics.json"
        self.summary: dict[str, Any] = {}
        self.trained = False

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.trained = True

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.trained and self.path.is_file():
            rank_zero_info(f"{self.path}: the run had finished, nothing was trained; its metrics stay")
            self.summary = json.loads(self.path.read_text())
            return
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
        self.summary["test"] = {
            k: v for k, v in _numbers(trainer.callback_metrics).items() if k.startswith("test/")
        }
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
