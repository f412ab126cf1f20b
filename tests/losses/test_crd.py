import math

import pytest
import torch
import torch.nn.functional as F

from histodistill.losses.crd import CRDLoss, nce_loss


def test_nce_loss_by_hand():
    scores = torch.tensor([[0.5, 0.1, 0.2], [0.3, 0.05, 0.4]])
    n = 10
    noise = 2 / n
    by_hand = 0.0
    for row in scores.tolist():
        by_hand += math.log(row[0] / (row[0] + noise)) + sum(math.log(noise / (x + noise)) for x in row[1:])
    assert nce_loss(scores, n).item() == pytest.approx(-by_hand / 2, rel=1e-5)


def test_crd_loss_on_a_tiny_memory_equals_the_formula():
    torch.manual_seed(0)
    n, dim, k, tau, mom = 6, 4, 2, 0.07, 0.5
    crd = CRDLoss(
        student_dim=3, teacher_dim=5, num_data=n, feat_dim=dim, nce_k=k, temperature=tau, momentum=mom
    )
    fs, ft = torch.randn(2, 3), torch.randn(2, 5)
    index = torch.tensor([1, 4])
    contrast = torch.tensor([[1, 0, 5], [4, 2, 2]])
    mem_s, mem_t = crd.memory.memory_student.clone(), crd.memory.memory_teacher.clone()
    vs = F.normalize(fs @ crd.embed_student.net.weight.T + crd.embed_student.net.bias, dim=1)
    vt = F.normalize(ft @ crd.embed_teacher.net.weight.T + crd.embed_teacher.net.bias, dim=1)

    def side(anchor, memory):
        raw = torch.stack([torch.exp(memory[contrast[i]] @ anchor[i] / tau) for i in range(2)])  # (2, 1 + k)
        z = raw.mean() * n
        return raw / z, z

    scores_t, z_t = side(vt, mem_s)
    scores_s, z_s = side(vs, mem_t)
    expected = nce_loss(scores_t, n) + nce_loss(scores_s, n)
    loss = crd(fs, ft, index, contrast)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert crd.memory.z_teacher.item() == pytest.approx(z_t.item(), rel=1e-5)
    assert crd.memory.z_student.item() == pytest.approx(z_s.item(), rel=1e-5)
    # memory update: m <- normalise(0.5 m + 0.5 v) at the batch's indices only
    torch.testing.assert_close(
        crd.memory.memory_student[index], F.normalize(mom * mem_s[index] + (1 - mom) * vs, dim=1)
    )
    torch.testing.assert_close(
        crd.memory.memory_teacher[index], F.normalize(mom * mem_t[index] + (1 - mom) * vt, dim=1)
    )
    untouched = torch.tensor([0, 2, 3, 5])
    torch.testing.assert_close(crd.memory.memory_student[untouched], mem_s[untouched])


def test_crd_z_is_fixed_after_the_first_batch_and_gradients_reach_both_heads():
    torch.manual_seed(1)
    crd = CRDLoss(student_dim=3, teacher_dim=3, num_data=8, feat_dim=4, nce_k=3)
    fs = torch.randn(2, 3, requires_grad=True)
    crd(fs, torch.randn(2, 3), torch.tensor([0, 1])).backward()
    z = crd.memory.z_student.item()
    crd(torch.randn(2, 3), torch.randn(2, 3), torch.tensor([2, 3]))
    assert crd.memory.z_student.item() == z
    assert fs.grad is not None and crd.embed_teacher.net.weight.grad is not None
