import copy

import pytest
import torch
from torch import nn

from histodistill.optim.ema import ema_update


def _net():
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def test_ema_equals_its_formula_for_every_parameter_and_leaves_bn_buffers():
    torch.manual_seed(0)
    target, source = _net(), _net()
    target[1].running_mean.fill_(0.25)
    source[1].running_mean.fill_(3.0)
    before = copy.deepcopy(target)
    ema_update(target, source, 0.9)
    for (name, new), old, src in zip(
        target.named_parameters(), before.parameters(), source.parameters(), strict=True
    ):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * src, msg=name)
    torch.testing.assert_close(target[1].running_mean, torch.full((4,), 0.25))
    assert int(target[1].num_batches_tracked) == int(before[1].num_batches_tracked)


def test_ema_refuses_different_architectures():
    with pytest.raises(ValueError, match="same architecture"):
        ema_update(_net(), nn.Linear(3, 2), 0.9)
