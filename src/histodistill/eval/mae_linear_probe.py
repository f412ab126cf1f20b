"""The linear probe as MAE's and SD-MAE's code runs it (``main_linprobe.py`` / ``run_mae_eval_linear.py``),
on frozen features: the number to set beside those papers' linear-probe results.

Head: ``BatchNorm1d(D, affine=False, eps=1e-6)`` (batch statistics in training, running statistics at
test) then ``Linear(D, C)`` with weight ~ trunc_normal(std 0.01), bias 0. SGD, momentum 0.9, no weight
decay, lr = 0.1 × B / 256 with B = 512; 90 epochs, the first 10 a linear warm-up, then a per-step
half cosine to 0; shuffled batches with the last incomplete one dropped. The features are the
frozen encoder's (mean of tokens for SD-MAE): precomputed, so the official per-image augmentation
(RandomResizedCrop + flip) is not applied (documented in docs/sdmae.md).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from histodistill.eval.metrics import classification_metrics
from histodistill.eval.probe import ProbeResult
from histodistill.optim.optimizer import OptimConfig, build_optimizer, build_scheduler, scaled_lr

EPOCHS, WARMUP_EPOCHS, BATCH_SIZE, BASE_LR = 90, 10, 512, 0.1


def mae_linear_probe(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, seed: int = 0,
    num_classes: int | None = None, epochs: int = EPOCHS, warmup_epochs: int = WARMUP_EPOCHS,
    batch_size: int = BATCH_SIZE, base_lr: float = BASE_LR,
) -> ProbeResult:
    """Train BN(affine=False) + Linear on ``train_x`` (N, D) and score ``test_x`` (M, D).

    A training set smaller than ``batch_size`` is used as one batch per step (the lr still follows B/256).
    """
    num_classes = num_classes or int(max(train_y.max(), test_y.max())) + 1
    x = torch.as_tensor(train_x, dtype=torch.float32)
    y = torch.as_tensor(train_y, dtype=torch.long)
    batch = min(batch_size, len(x))
    steps_per_epoch = len(x) // batch
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = nn.Sequential(nn.BatchNorm1d(x.shape[1], affine=False, eps=1e-6), nn.Linear(x.shape[1], num_classes))
        nn.init.trunc_normal_(head[1].weight, std=0.01)  # MoCo v3 / MAE: the head starts near zero
        nn.init.zeros_(head[1].bias)
        config = OptimConfig(name="sgd", lr=base_lr, reference_batch_size=256, momentum=0.9, weight_decay=0.0,
                             warmup_epochs=warmup_epochs, min_lr=0.0)
        lr = scaled_lr(config, batch)
        optimizer = build_optimizer(head, config, lr)
        scheduler = build_scheduler(optimizer, config, lr, epochs * steps_per_epoch, steps_per_epoch)
        generator = torch.Generator().manual_seed(seed)
        head.train()
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=generator)[: steps_per_epoch * batch].view(steps_per_epoch, batch)
            for index in order:  # (batch,) sample indices; the remainder is dropped, as drop_last=True
                loss = nn.functional.cross_entropy(head(x[index]), y[index])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                scheduler.step()
    head.eval()
    with torch.no_grad():
        probs = head(torch.as_tensor(test_x, dtype=torch.float32)).softmax(dim=1).numpy()
    return ProbeResult(classification_metrics(test_y, probs, num_classes), probs)
