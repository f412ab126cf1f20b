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


def test_hint_is_mse_of_the_regressed_student_feature():
    torch.manual_seed(0)
    hint = HintLoss(3, 2)
    fs, ft = torch.randn(4, 3), torch.randn(4, 2)
    by_hand = ((fs @ hint.regressor.weight.T + hint.regressor.bias - ft) ** 2).mean()
    assert hint(fs, ft).item() == pytest.approx(by_hand.item(), rel=1e-6)
