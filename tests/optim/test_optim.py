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
    values = lrs(
        OptimConfig(lr=0.2, warmup_fraction=0.25, schedule="constant"), total_steps=8, steps_per_epoch=8
    )
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
    assert sorted(names[id(p)] for p in no_decay["params"]) == [
        "conv.bias",
        "head.bias",
        "norm.bias",
        "norm.weight",
        "pos_embed",
    ]
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0


def test_per_epoch_cosine_is_momas_adjust_learning_rate():
    # trinhvg/MoMA helper/util.py: for epoch e = 1..E, lr = eta_min + (lr − eta_min)(1 + cos(π e / E)) / 2,
    # eta_min = lr · 0.1³, set once at the start of the epoch.
    lr, epochs, steps_per_epoch = 0.05, 5, 3
    values = lrs(
        OptimConfig(name="sgd", lr=lr, min_lr=lr * 1e-3, schedule="cosine_epoch"),
        total_steps=epochs * steps_per_epoch,
        steps_per_epoch=steps_per_epoch,
    )
    expected = [
        lr * 1e-3 + (lr - lr * 1e-3) * (1 + math.cos(math.pi * e / epochs)) / 2 for e in range(1, epochs + 1)
    ]
    assert values == pytest.approx([v for v in expected for _ in range(steps_per_epoch)])
    assert values[-1] == pytest.approx(lr * 1e-3) and values[0] < lr


def test_weight_decay_on_all_parameters_is_one_decayed_group():
    net = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    optimizer = build_optimizer(
        net, OptimConfig(name="sgd", lr=0.1, weight_decay=1e-4, weight_decay_on="all"), 0.1
    )
    assert [group["weight_decay"] for group in optimizer.param_groups] == [1e-4]
    assert len(optimizer.param_groups[0]["params"]) == 4  # both weights and both biases


def test_layer_decay_follows_beits_rule_for_a_vit():
    from histodistill.methods.supervised import Supervised

    module = Supervised(
        "tiny/vit-tiny-p8-64",
        pretrained=False,
        num_classes=3,
        backbone_kwargs={"depth": 3, "embed_dim": 48, "num_heads": 3},
    )
    optimizer = build_optimizer(module, OptimConfig(lr=1.0, layer_decay=0.5), 1.0)
    rate = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    named = dict(module.named_parameters())
    # 3 blocks: stem is layer 0 -> 0.5**4, block j is layer j+1 -> 0.5**(3-j), norm and classifier 0.5**0.
    assert rate[id(named["backbone.model.patch_embed.proj.weight"])] == pytest.approx(0.5**4)
    assert rate[id(named["backbone.model.cls_token"])] == pytest.approx(0.5**4)
    assert rate[id(named["backbone.model.blocks.0.attn.qkv.weight"])] == pytest.approx(0.5**3)
    assert rate[id(named["backbone.model.blocks.2.mlp.fc1.bias"])] == pytest.approx(0.5**1)
    assert rate[id(named["backbone.model.norm.weight"])] == pytest.approx(1.0)
    assert rate[id(named["classifier.weight"])] == pytest.approx(1.0)
    decayed = {
        id(p) for group in optimizer.param_groups if group["weight_decay"] > 0 for p in group["params"]
    }
    assert id(named["backbone.model.blocks.0.attn.qkv.bias"]) not in decayed
    assert id(named["backbone.model.blocks.0.attn.qkv.weight"]) in decayed


def test_layer_decay_refuses_a_cnn():
    from histodistill.errors import UserError
    from histodistill.methods.supervised import Supervised

    with pytest.raises(UserError, match="ViT"):
        build_optimizer(
            Supervised("tiny/resnet18-64", pretrained=False, num_classes=3),
            OptimConfig(layer_decay=0.75),
            1e-3,
        )
