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
    expected = -sum(
        (1 - eps) * log_probs[i, labels[i]] + eps / classes * log_probs[i].sum() for i in range(2)
    ) / 2
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
