import math

import pytest
import torch
import torch.nn.functional as F

from histodistill.losses.infonce import MoCoQueue, infonce_logits, infonce_loss


def test_logits_and_loss_equal_a_hand_computation():
    q = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    k = torch.tensor([[0.0, 1.0], [0.6, 0.8]])
    queue = torch.tensor([[1.0, 0.0], [0.0, -1.0], [-0.6, 0.8]])
    tau = 0.5
    expected_logits = torch.tensor([[0.0, 1.0, 0.0, -0.6], [1.0, 0.6, -0.8, 0.28]]) / tau
    logits = infonce_logits(q, k, queue, tau)
    torch.testing.assert_close(logits, expected_logits)
    by_hand = 0.0
    for row in expected_logits.tolist():
        by_hand += -row[0] + math.log(sum(math.exp(v) for v in row))
    assert infonce_loss(q, k, queue, tau).item() == pytest.approx(by_hand / 2, rel=1e-6)


def test_queue_starts_as_unit_vectors():
    queue = MoCoQueue(dim=8, size=16)
    torch.testing.assert_close(queue.queue.norm(dim=1), torch.ones(16))
    assert int(queue.pointer) == 0


def test_queue_is_fifo_with_wrap_around():
    queue = MoCoQueue(dim=2, size=5)
    first = torch.arange(6, dtype=torch.float32).reshape(3, 2)
    queue.enqueue(first)
    assert int(queue.pointer) == 3
    torch.testing.assert_close(queue.queue[:3], first)
    second = -torch.arange(1, 7, dtype=torch.float32).reshape(3, 2)
    queue.enqueue(second)  # slots 3, 4, then wraps to 0
    assert int(queue.pointer) == 1
    torch.testing.assert_close(queue.queue[3:5], second[:2])
    torch.testing.assert_close(queue.queue[0], second[2])
    torch.testing.assert_close(queue.queue[1:3], first[1:])  # the oldest surviving entries are untouched


def test_queue_refuses_more_keys_than_it_holds():
    with pytest.raises(ValueError, match="queue size"):
        MoCoQueue(dim=2, size=3).enqueue(torch.zeros(4, 2))


def test_queue_entries_never_carry_gradient():
    queue = MoCoQueue(dim=4, size=8)
    q = F.normalize(torch.randn(2, 4), dim=1).requires_grad_(True)
    k = F.normalize(torch.randn(2, 4), dim=1).requires_grad_(True)
    infonce_loss(q, k, queue.queue, 0.15).backward()
    assert q.grad is not None and k.grad is not None
    assert not queue.queue.requires_grad
