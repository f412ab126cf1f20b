import math

import pytest
import torch

from histodistill.losses.hint import HintLoss
from histodistill.losses.kd import kd_loss


def test_kd_equals_t_squared_kl_by_hand():
    student = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    teacher = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    t = 4.0
    expected = 0.0
    for zs, zt in zip(student.tolist(), teacher.tolist(), strict=True):
        ps = [math.exp(v / t) for v in zs]
        pt = [math.exp(v / t) for v in zt]
        ps = [v / sum(ps) for v in ps]
        pt = [v / sum(pt) for v in pt]
        expected += sum(b * math.log(b / a) for a, b in zip(ps, pt, strict=True))
    expected = t * t * expected / 2
    assert kd_loss(student, teacher, t).item() == pytest.approx(expected, rel=1e-5)


def test_kd_is_zero_for_equal_logits_and_does_not_train_the_teacher():
    student = torch.randn(3, 5, requires_grad=True)
    teacher = student.detach().clone().requires_grad_(True)
    loss = kd_loss(student, teacher)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    loss.backward()
    assert student.grad is not None and teacher.grad is None


def test_kd_refuses_different_class_counts():
    with pytest.raises(ValueError, match="same shape"):
        kd_loss(torch.randn(2, 3), torch.randn(2, 4))


def test_hint_is_the_official_convreg_then_mse_on_the_pooled_feature():
    # MoMA's comparison: hint_layer 5 is the pooled (B, C, 1, 1) feature; RepDistiller's ConvReg for equal
    # 1x1 maps is conv 1x1 (bias) -> BatchNorm2d (training: batch mean, biased variance, eps 1e-5) -> ReLU,
    # then nn.MSELoss. Recomputed here element by element with fixed weights.
    hint = HintLoss(3, 2)
    conv, bn = hint.regressor[0], hint.regressor[1]
    w = [[0.5, -1.0, 0.25], [1.5, 0.5, -0.5]]
    b, gamma, beta = [0.1, -0.2], [1.2, 0.8], [0.3, -0.1]
    with torch.no_grad():
        conv.weight.copy_(torch.tensor(w).view(2, 3, 1, 1))
        conv.bias.copy_(torch.tensor(b))
        bn.weight.copy_(torch.tensor(gamma))
        bn.bias.copy_(torch.tensor(beta))
    fs = [[1.0, 2.0, -1.0], [0.0, 1.0, 3.0], [-2.0, 0.5, 1.0], [1.5, -1.0, 0.0]]
    ft = [[0.2, 1.0], [1.5, 0.0], [0.0, 0.3], [2.0, 1.0]]
    z = [[sum(w[o][i] * x[i] for i in range(3)) + b[o] for o in range(2)] for x in fs]
    expected = 0.0
    for o in range(2):
        column = [row[o] for row in z]
        mean = sum(column) / 4
        var = sum((v - mean) ** 2 for v in column) / 4
        for row, target in zip(column, ft, strict=True):
            y = max(0.0, (row - mean) / math.sqrt(var + 1e-5) * gamma[o] + beta[o])
            expected += (y - target[o]) ** 2
    expected /= 8
    hint.train()
    assert hint(torch.tensor(fs), torch.tensor(ft)).item() == pytest.approx(expected, rel=1e-5)
