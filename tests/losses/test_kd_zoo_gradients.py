"""Every kd_zoo loss sends a finite, non-zero gradient to the student side (and to its adapters) and none
to the teacher side: the teacher is never trained through a distillation term."""

import pytest
import torch

from histodistill.losses.activation_boundary import ABConnectors
from histodistill.losses.attention_transfer import at_loss
from histodistill.losses.correlation_congruence import cc_loss
from histodistill.losses.factor_transfer import Paraphraser, ft_loss
from histodistill.losses.fsp import fsp_loss
from histodistill.losses.nst import nst_loss
from histodistill.losses.pkt import pkt_loss
from histodistill.losses.rkd import rkd_loss
from histodistill.losses.semckd import SemCKDLoss
from histodistill.losses.similarity_preserving import sp_loss
from histodistill.losses.simkd import SimKDProjector, simkd_loss
from histodistill.losses.srrl import SRRLLoss
from histodistill.losses.vid import VIDLoss

MAP_S, MAP_T, VEC_S, VEC_T = (4, 3, 4, 4), (4, 5, 2, 2), (4, 6), (4, 8)


def _srrl():
    srrl, classifier = SRRLLoss(6, 8), torch.nn.Linear(8, 3)
    return srrl, lambda s, t: srrl(s, t, classifier, torch.randn(4, 3))


def _simkd():
    projector = SimKDProjector(3, 5)
    return projector, lambda s, t: simkd_loss(projector(s), t)


def _semckd():
    criterion = SemCKDLoss([3], [5], batch_size=4)
    return criterion, lambda s, t: criterion([s], [t])


CASES = {
    "at": (MAP_S, MAP_T, lambda: (None, at_loss)),
    "sp": (MAP_S, MAP_T, lambda: (None, sp_loss)),
    "cc": (VEC_S, VEC_S, lambda: (None, cc_loss)),
    "vid": (MAP_S, MAP_T, lambda: (m := VIDLoss(3, 5), m)),
    "rkd": (VEC_S, VEC_T, lambda: (None, rkd_loss)),
    "pkt": (VEC_S, VEC_T, lambda: (None, pkt_loss)),
    "ab": (MAP_S, MAP_T, lambda: (m := ABConnectors([3], [5]), lambda s, t: m([s], [t]))),
    "ft": (MAP_S, MAP_S, lambda: (None, ft_loss)),
    "fsp": (MAP_S, MAP_S, lambda: (None, lambda s, t: fsp_loss([s, s.pow(2)], [t, t.pow(2)]))),
    "nst": (MAP_S, MAP_T, lambda: (None, nst_loss)),
    "semckd": (MAP_S, MAP_T, _semckd),
    "simkd": (MAP_S, MAP_T, _simkd),
    "srrl": (VEC_S, VEC_T, _srrl),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_gradient_reaches_the_student_and_its_adapters_never_the_teacher(name):
    torch.manual_seed(0)
    s_shape, t_shape, make = CASES[name]
    module, loss_fn = make()
    student = torch.randn(s_shape, requires_grad=True)
    teacher = torch.randn(t_shape, requires_grad=True)
    loss = loss_fn(student, teacher)
    loss.backward()
    assert torch.isfinite(loss)
    assert student.grad is not None and torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
    assert teacher.grad is None
    if module is not None:
        grads = [p.grad for p in module.parameters() if p.requires_grad]
        assert grads and any(g is not None and g.abs().sum() > 0 for g in grads)


def test_ft_paraphraser_trains_on_reconstruction_of_the_teacher_alone():
    paraphraser = Paraphraser(4, rate=0.5)
    teacher = torch.randn(2, 4, 3, 3, requires_grad=True)
    paraphraser.reconstruction_loss(teacher).backward()
    assert teacher.grad is None and paraphraser.factor_channels == 2
    assert all(p.grad is not None for p in paraphraser.parameters())
