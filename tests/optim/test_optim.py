"""The optimiser schedule against its formula, and which parameters escape weight decay."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from histodistill.optim.optimizer import (
    OptimConfig,
    build_optimizer,
    build_scheduler,
    parameter_groups,
    scaled_lr,
)


def lrs(config: OptimConfig, total_steps: int, steps_per_epoch: int) -> list[float]:
    optimizer = build_optimizer(nn.Linear(2, 2), config, config.lr)
    scheduler = build_scheduler(optimizer, config, config.lr, total_steps, steps_per_epoch)
    values = []
    for _ in range(total_steps):
        values.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return values


def test_warmup_then_cosine_matches_the_formula():
    config = OptimConfig(lr=0.1, min_lr=0.01, warmup_epochs=1, schedule="cosine")
    values = lrs(config, total_steps=20, steps_per_epoch=4)  # 4 warm-up steps, 16 cosine steps
    for step in range(4):
        assert values[step] == pytest.approx(0.1 * (step + 1) / 4)
    for step in (4, 10, 19):
        progress = (step - 4) / 16
        assert values[step] == pytest.approx(0.01 + 0.09 * 0.5 * (1 + math.cos(math.pi * progress)))


def test_constant_schedule_stays_flat_after_warmup():
    values = lrs(OptimConfig(lr=0.2, warmup_fraction=0.25, schedule="constant"), total_steps=8, steps_per_epoch=8)
    assert values[:2] == pytest.approx([0.1, 0.2]) and values[2:] == pytest.approx([0.2] * 6)


def test_linear_batch_scaling():
    assert scaled_lr(OptimConfig(lr=1.5e-4, reference_batch_size=256), 1024) == pytest.approx(6e-4)
    assert scaled_lr(OptimConfig(lr=1e-3), 1024) == 1e-3


def test_no_weight_decay_on_biases_norms_and_embeddings():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.norm = nn.LayerNorm(4)
            self.pos_embed = nn.Parameter(torch.zeros(1, 5, 4))
            self.head = nn.Linear(4, 2)
            self.frozen = nn.Linear(4, 4)
            self.frozen.requires_grad_(False)

    net = Net()
    decay, no_decay = parameter_groups(net, 0.05)
    names = {id(p): n for n, p in net.named_parameters()}
    assert sorted(names[id(p)] for p in decay["params"]) == ["conv.weight", "head.weight"]
    assert sorted(names[id(p)] for p in no_decay["params"]) == ["conv.bias", "head.bias", "norm.bias", "norm.weight",
                                                                 "pos_embed"]
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
