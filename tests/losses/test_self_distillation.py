"""SD-MAE's self-distillation term, its centre, and the DINO head's fixed last-layer norm."""

from __future__ import annotations

import math

import pytest
import torch

from histodistill.losses.self_distillation import SelfDistillationLoss
from histodistill.models.dino_head import DINOHead


def softmax(values):
    exps = [math.exp(v - max(values)) for v in values]
    return [e / sum(exps) for e in exps]


def test_loss_equals_hand_computation():
    student = [[0.3, -0.2, 0.1], [0.0, 0.5, -0.4]]
    teacher = [[0.05, 0.01, -0.02], [-0.03, 0.04, 0.0]]
    loss_fn = SelfDistillationLoss(3, student_temp=0.1, teacher_temp=0.04)
    loss_fn.center.copy_(torch.tensor([[0.01, -0.01, 0.02]]))
    center = [0.01, -0.01, 0.02]
    expected = 0.0
    for s, t in zip(student, teacher, strict=True):
        q = softmax([v / 0.1 for v in s])
        p = softmax([(v - c) / 0.04 for v, c in zip(t, center, strict=True)])
        expected += sum(-pi * math.log(qi) for pi, qi in zip(p, q, strict=True)) / len(student)
    assert loss_fn(torch.tensor(student), torch.tensor(teacher)).item() == pytest.approx(expected, rel=1e-5)


def test_center_follows_ema_of_teacher_probabilities():
    loss_fn = SelfDistillationLoss(4, teacher_temp=0.04, center_momentum=0.9)
    old = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    loss_fn.center.copy_(old)
    teacher = torch.randn(5, 4)
    probs = torch.softmax((teacher - old) / 0.04, dim=-1)
    loss_fn(torch.randn(5, 4), teacher)
    torch.testing.assert_close(loss_fn.center, 0.9 * old + 0.1 * probs.mean(dim=0, keepdim=True))
    center = loss_fn.center.clone()
    loss_fn.eval()  # evaluation never moves the centre
    loss_fn(torch.randn(5, 4), teacher)
    assert torch.equal(loss_fn.center, center)


@pytest.mark.parametrize("stop_grad", [False, True])
def test_teacher_gradient_follows_stop_grad_option(stop_grad):
    student = torch.randn(3, 6, requires_grad=True)
    teacher = torch.randn(3, 6, requires_grad=True)
    SelfDistillationLoss(6, stop_grad_teacher=stop_grad)(student, teacher).backward()
    assert student.grad is not None
    assert (teacher.grad is None) == stop_grad


def test_last_layer_norm_stays_fixed_under_training():
    torch.manual_seed(0)
    head = DINOHead(8, out_dim=16, hidden_dim=12, bottleneck_dim=4)
    g = head.last_layer.parametrizations.weight.original0
    assert not g.requires_grad and torch.all(g == 1)
    optimizer = torch.optim.AdamW(
        [p for p in head.parameters() if p.requires_grad], lr=0.1, weight_decay=0.05
    )
    v_before = head.last_layer.parametrizations.weight.original1.detach().clone()
    for _ in range(3):
        optimizer.zero_grad()
        head(torch.randn(5, 8)).pow(2).sum().backward()
        optimizer.step()
    assert torch.all(g == 1)
    assert not torch.equal(v_before, head.last_layer.parametrizations.weight.original1)  # v did train
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(16))


def test_token_mean_equals_the_mean_of_per_token_outputs():
    torch.manual_seed(0)
    head = DINOHead(8, out_dim=16, hidden_dim=12, bottleneck_dim=4)
    tokens = torch.randn(3, 7, 8)
    torch.testing.assert_close(head.forward_token_mean(tokens), head(tokens).mean(dim=1))


def test_head_shapes_per_token():
    out = DINOHead(8, out_dim=16, hidden_dim=12, bottleneck_dim=4)(torch.randn(2, 5, 8))
    assert out.shape == (2, 5, 16) and torch.isfinite(out).all()
