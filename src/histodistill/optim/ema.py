"""Exponential moving average of one module's parameters into another (MoCo / mean-teacher rule)."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def ema_update(target: nn.Module, source: nn.Module, momentum: float) -> None:
    """``target ← momentum · target + (1 − momentum) · source`` for every parameter.

    Buffers (BatchNorm running statistics) are left alone: the target keeps its own, computed from
    the batches it sees, as in MoCo and MoMA. Both modules must have the same parameter names/shapes.
    """
    target_params = dict(target.named_parameters())
    source_params = dict(source.named_parameters())
    if target_params.keys() != source_params.keys():
        missing = sorted(set(source_params) ^ set(target_params))[:5]
        raise ValueError(f"EMA needs the same architecture on both sides; differing parameters: {missing}")
    for name, param in target_params.items():
        param.mul_(momentum).add_(source_params[name].detach().to(param.dtype), alpha=1.0 - momentum)
