"""Optimiser and per-step learning-rate schedule shared by every method.

One typed config (`OptimConfig`) that YAML recipes fill in; parameter groups that keep weight
decay off biases, norms, position embeddings and tokens (as MAE, DINO and timm do); a warm-up
followed by a half-cycle cosine, evaluated per optimiser step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

# Parameters whose names contain one of these get no weight decay, whatever their shape.
NO_DECAY_NAME_PARTS = ("pos_embed", "cls_token", "mask_token", "reg_token", "pos_table")


@dataclass
class OptimConfig:
    """How to optimise. ``lr`` is the base rate; with ``reference_batch_size`` set it is scaled
    linearly by ``effective batch / reference_batch_size`` (the MAE/SD-MAE rule ``lr = base × B/256``).

    Warm-up lasts ``warmup_epochs`` epochs or ``warmup_fraction`` of all steps, whichever is longer;
    then the rate follows a half cosine from ``lr`` to ``min_lr`` (``schedule: constant`` keeps it flat).
    """

    name: Literal["adamw", "sgd", "adam"] = "adamw"
    lr: float = 1e-3
    reference_batch_size: int | None = None
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.9
    nesterov: bool = False
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_epochs: float = 0.0
    warmup_fraction: float = 0.0
    min_lr: float = 0.0

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"optim.warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"optim.min_lr must be in [0, lr={self.lr}], got {self.min_lr}")


def scaled_lr(config: OptimConfig, effective_batch_size: int) -> float:
    """The base rate after the linear batch-size rule (unchanged when no reference is set)."""
    if config.reference_batch_size is None:
        return config.lr
    return config.lr * effective_batch_size / config.reference_batch_size


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed weights (matrices, kernels) and undecayed ones (biases, norms, embeddings).

    Frozen parameters are left out so optimisers never hold state for them. A module may list extra
    names in ``no_weight_decay()`` (the timm convention).
    """
    extra: set[str] = set()
    for prefix, module in model.named_modules():
        if hasattr(module, "no_weight_decay"):
            extra |= {f"{prefix}.{name}" if prefix else name for name in module.no_weight_decay()}
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name in extra or any(part in name for part in NO_DECAY_NAME_PARTS):
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, config: OptimConfig, lr: float) -> torch.optim.Optimizer:
    groups = parameter_groups(model, config.weight_decay)
    if config.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=config.momentum, nesterov=config.nesterov)
    if config.name == "adam":
        return torch.optim.Adam(groups, lr=lr, betas=config.betas)
    return torch.optim.AdamW(groups, lr=lr, betas=config.betas)


def warmup_cosine_factor(step: int, total_steps: int, warmup_steps: int, min_factor: float, cosine: bool) -> float:
    """Multiplier of the base rate at optimiser step ``step`` (0-based).

    Linear warm-up from ~0 to 1 over ``warmup_steps``, then a half cosine from 1 to ``min_factor``
    at ``total_steps`` (or flat at 1 when ``cosine`` is False).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if not cosine:
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: OptimConfig, lr: float, total_steps: int, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    warmup_steps = max(
        round(config.warmup_epochs * steps_per_epoch), round(config.warmup_fraction * total_steps)
    )
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    min_factor = config.min_lr / lr if lr > 0 else 0.0

    def factor(step: int) -> float:
        return warmup_cosine_factor(step, total_steps, warmup_steps, min_factor, config.schedule == "cosine")

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
