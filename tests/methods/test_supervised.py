"""The supervised baseline: logits shape, the CE objective against its formula, the checkpoint record."""

from __future__ import annotations

import math

import pytest
import torch

from histodistill.errors import UserError
from histodistill.methods.base import backbone_record
from histodistill.methods.supervised import Supervised


@pytest.fixture(scope="module")
def model() -> Supervised:
    torch.manual_seed(0)
    return Supervised(backbone="tiny/resnet18-64", pretrained=False, num_classes=3, label_smoothing=0.1)


def test_forward_gives_finite_logits(model):
    logits = model(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()


def test_objective_is_label_smoothed_cross_entropy(model):
    images, labels = torch.randn(2, 3, 64, 64), torch.tensor([0, 2])
    model.eval()  # fixed BatchNorm statistics, so forward() twice gives the same logits
    with torch.no_grad():
        logits = model(images)
        loss = model.objective((images, labels))["loss"]
    log_probs = logits.log_softmax(dim=1)
    # Smoothed target: 1 - eps on the label plus eps / C everywhere.
    eps, classes = 0.1, 3
    expected = (
        -sum((1 - eps) * log_probs[i, labels[i]] + eps / classes * log_probs[i].sum() for i in range(2)) / 2
    )
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert math.isfinite(loss.item())


def test_checkpoint_record_points_at_the_backbone_weights(model):
    record = backbone_record(model)
    assert record["state_dict_prefix"] == "backbone.model."
    assert any(key.startswith("backbone.model.") for key in model.state_dict())
    assert record["spec"]["name"] == "tiny/resnet18-64"


def test_invalid_arguments_are_user_errors():
    with pytest.raises(UserError, match="label_smoothing"):
        Supervised(backbone="tiny/resnet18-64", pretrained=False, num_classes=3, label_smoothing=1.5)
    with pytest.raises(UserError, match="num_classes"):
        Supervised(backbone="tiny/resnet18-64", pretrained=False, num_classes=1)


def test_mixup_cutmix_objective_is_soft_target_ce_on_timms_mixed_batch():
    import numpy as np
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy

    torch.manual_seed(0)
    model = Supervised(
        backbone="tiny/resnet18-64",
        pretrained=False,
        num_classes=3,
        label_smoothing=0.1,
        mixup=0.8,
        cutmix=1.0,
    ).train()
    images, labels = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 0])
    for seed in (0, 3):  # seeds that draw mixup and cutmix
        np.random.seed(seed)
        loss = model.objective((images.clone(), labels))["loss"]
        np.random.seed(seed)
        mixed, targets = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=3)(
            images.clone(), labels
        )
        assert not torch.equal(mixed, images) and torch.allclose(targets.sum(1), torch.ones(4))
        torch.testing.assert_close(loss, SoftTargetCrossEntropy()(model(mixed), targets))
    with pytest.raises(UserError, match="even batch"):
        model.objective((images[:3], labels[:3]))
