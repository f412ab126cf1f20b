"""The MCM-KD loss against the formula computed by hand on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch

from histodistill.losses.masked_context import masked_context_loss, normalise_targets


def hand_layer_norm(v: list[float]) -> list[float]:
    mean = sum(v) / len(v)
    var = sum((x - mean) ** 2 for x in v) / len(v)
    return [(x - mean) / math.sqrt(var + 1e-6) for x in v]


def hand_cosine_loss(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return 1 - dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def hand_smooth_l1(a: list[float], b: list[float], beta: float) -> float:
    terms = [0.5 * (x - y) ** 2 / beta if abs(x - y) < beta else abs(x - y) - 0.5 * beta for x, y in zip(a, b, strict=True)]
    return sum(terms) / len(terms)


# One window of 4 cells: cell 0 masked, cell 1 masked but not tissue, cells 2-3 visible.
PRED = [[1.0, 2.0, 0.5], [3.0, -1.0, 0.0], [0.0, 1.0, -1.0], [2.0, 2.0, 1.0]]
TEACHER = [[2.0, 0.0, 4.0], [1.0, 1.0, 7.0], [-3.0, 5.0, 1.0], [0.5, 0.5, 2.0]]
MASKED = [True, True, False, False]
VALID = [True, False, True, True]


def run(kind: str, w_masked: float, w_visible: float, beta: float = 1.0) -> dict[str, torch.Tensor]:
    return masked_context_loss(
        torch.tensor([PRED]), torch.tensor([TEACHER]), torch.tensor([MASKED]), torch.tensor([VALID]),
        kind=kind, w_masked=w_masked, w_visible=w_visible, beta=beta,
    )


@pytest.mark.parametrize(("kind", "beta"), [("cosine", 1.0), ("smooth_l1", 1.0), ("smooth_l1", 0.5)])
def test_loss_equals_hand_computation(kind, beta):
    def cell(k: int) -> float:
        target = hand_layer_norm(TEACHER[k])
        return hand_cosine_loss(PRED[k], target) if kind == "cosine" else hand_smooth_l1(PRED[k], target, beta)

    masked = cell(0)  # cell 1 is masked but has no teacher feature
    visible = (cell(2) + cell(3)) / 2
    out = run(kind, w_masked=2.0, w_visible=0.5, beta=beta)
    assert out["masked"].item() == pytest.approx(masked, rel=1e-5)
    assert out["visible"].item() == pytest.approx(visible, rel=1e-5)
    assert out["loss"].item() == pytest.approx(2.0 * masked + 0.5 * visible, rel=1e-5)


def test_zero_masked_weight_is_pure_visible_distillation():
    pred = torch.tensor([PRED], requires_grad=True)
    out = masked_context_loss(pred, torch.tensor([TEACHER]), torch.tensor([MASKED]), torch.tensor([VALID]), w_masked=0.0)
    assert out["loss"].item() == pytest.approx(out["visible"].item())
    out["loss"].backward()
    assert pred.grad[0, 0].abs().sum() == 0 and pred.grad[0, 1].abs().sum() == 0  # masked cells learn nothing
    assert pred.grad[0, 2].abs().sum() > 0


def test_invalid_cells_do_not_change_the_loss():
    teacher = torch.tensor([TEACHER])
    changed = teacher.clone()
    changed[0, 1] = 1e6  # the non-tissue cell's "feature" is garbage
    base = run("cosine", 1.0, 1.0)["loss"]
    other = masked_context_loss(torch.tensor([PRED]), changed, torch.tensor([MASKED]), torch.tensor([VALID]))["loss"]
    assert torch.equal(base, other)


def test_targets_are_layer_normed_without_affine():
    target = normalise_targets(torch.tensor([[2.0, 0.0, 4.0]]) * 10 + 3)
    assert target.mean().item() == pytest.approx(0, abs=1e-6)
    assert target.var(unbiased=False).item() == pytest.approx(1, rel=1e-4)


def test_a_perfect_prediction_has_zero_loss():
    target = normalise_targets(torch.tensor([TEACHER]))
    out = masked_context_loss(target, torch.tensor([TEACHER]), torch.tensor([MASKED]), torch.tensor([VALID]), kind="smooth_l1")
    assert out["loss"].item() == pytest.approx(0, abs=1e-6)
