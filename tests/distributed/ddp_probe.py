"""A callback for the DDP tests: what each rank holds at the end of a fit, saved for the test to compare.

Writes ``<default_root_dir>/rank<r>.pt``: every buffer of the module (SD-MAE's centre, MoMA's queue and
pointer, CRD's memories) and, after validation, the logged ``val/loss`` beside the loss recomputed by
this rank on the *whole* validation set with the same weights.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F


class KeepRankState(L.Callback):
    def __init__(self) -> None:
        self.record: dict = {}

    @torch.no_grad()
    def on_validation_end(self, trainer, module) -> None:
        if trainer.sanity_checking or "val/loss" not in trainer.callback_metrics:
            return
        dataset = trainer.datamodule.datasets["val"]  # unsharded: every sample once
        images, targets = zip(*(dataset[i][:2] for i in range(len(dataset))), strict=True)
        logits = module(torch.stack(images).to(module.device)).float()
        self.record["val"] = {
            "logged": float(trainer.callback_metrics["val/loss"]),
            "whole_set": float(F.cross_entropy(logits, torch.as_tensor(targets))),
            "samples": len(dataset),
        }

    def on_train_end(self, trainer, module) -> None:
        self.record["buffers"] = {
            name: value.detach().cpu().clone() for name, value in module.named_buffers()
        }
        self.record["global_step"] = trainer.global_step
        torch.save(self.record, Path(trainer.default_root_dir) / f"rank{trainer.global_rank}.pt")
