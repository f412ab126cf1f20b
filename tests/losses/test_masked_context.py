"""The MCM-KD loss against the formula computed by hand on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from histodistill.losses.masked_context import masked_context_loss, mean_direction_share, normalise_targets


def hand_layer_norm(v: list[float]) -> list[float]:
    mean = sum(v) / len(v)
    var = sum((x - mean) ** 2 for x in v) / len(v)
    return [(x - mean) / math.sqrt(var + 1e-6) for x in v]


def hand_cosine_loss(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return 1 - dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def hand_smooth_l1(a: list[float], b: list[float], beta: float) -> float:
    terms = [
        0.5 * (x - y) ** 2 / beta if abs(x - y) < beta else abs(x - y) - 0.5 * beta
        for x, y in zip(a, b, strict=True)
    ]
    return sum(terms) / len(terms)


# One window of 4 cells: cell 0 masked, cell 1 masked but not tissue, cells 2-3 visible.
PRED = [[1.0, 2.0, 0.5], [3.0, -1.0, 0.0], [0.0, 1.0, -1.0], [2.0, 2.0, 1.0]]
TEACHER = [[2.0, 0.0, 4.0], [1.0, 1.0, 7.0], [-3.0, 5.0, 1.0], [0.5, 0.5, 2.0]]
MASKED = [True, True, False, False]
VALID = [True, False, True, True]


def run(kind: str, w_masked: float, w_visible: float, beta: float = 1.0) -> dict[str, torch.Tensor]:
    return masked_context_loss(
        torch.tensor([PRED]),
        torch.tensor([TEACHER]),
        torch.tensor([MASKED]),
        torch.tensor([VALID]),
        kind=kind,
        w_masked=w_masked,
        w_visible=w_visible,
        beta=beta,
    )


@pytest.mark.parametrize(("kind", "beta"), [("cosine", 1.0), ("smooth_l1", 1.0), ("smooth_l1", 0.5)])
def test_loss_equals_hand_computation(kind, beta):
    def cell(k: int) -> float:
        target = hand_layer_norm(TEACHER[k])
        return (
            hand_cosine_loss(PRED[k], target) if kind == "cosine" else hand_smooth_l1(PRED[k], target, beta)
        )

    masked = cell(0)  # cell 1 is masked but has no teacher feature
    visible = (cell(2) + cell(3)) / 2
    out = run(kind, w_masked=2.0, w_visible=0.5, beta=beta)
    assert out["masked"].item() == pytest.approx(masked, rel=1e-5)
    assert out["visible"].item() == pytest.approx(visible, rel=1e-5)
    assert out["loss"].item() == pytest.approx(2.0 * masked + 0.5 * visible, rel=1e-5)


def test_zero_masked_weight_is_pure_visible_distillation():
    pred = torch.tensor([PRED], requires_grad=True)
    out = masked_context_loss(
        pred, torch.tensor([TEACHER]), torch.tensor([MASKED]), torch.tensor([VALID]), w_masked=0.0
    )
    assert out["loss"].item() == pytest.approx(out["visible"].item())
    out["loss"].backward()
    assert pred.grad[0, 0].abs().sum() == 0 and pred.grad[0, 1].abs().sum() == 0  # masked cells learn nothing
    assert pred.grad[0, 2].abs().sum() > 0


def test_invalid_cells_do_not_change_the_loss():
    teacher = torch.tensor([TEACHER])
    changed = teacher.clone()
    changed[0, 1] = 1e6  # the non-tissue cell's "feature" is garbage
    base = run("cosine", 1.0, 1.0)["loss"]
    other = masked_context_loss(torch.tensor([PRED]), changed, torch.tensor([MASKED]), torch.tensor([VALID]))[
        "loss"
    ]
    assert torch.equal(base, other)


def test_targets_are_layer_normed_without_affine():
    target = normalise_targets(torch.tensor([[2.0, 0.0, 4.0]]) * 10 + 3)
    assert target.mean().item() == pytest.approx(0, abs=1e-6)
    assert target.var(unbiased=False).item() == pytest.approx(1, rel=1e-4)


def test_a_perfect_prediction_has_zero_loss():
    target = normalise_targets(torch.tensor([TEACHER]))
    out = masked_context_loss(
        target, torch.tensor([TEACHER]), torch.tensor([MASKED]), torch.tensor([VALID]), kind="smooth_l1"
    )
    assert out["loss"].item() == pytest.approx(0, abs=1e-6)


# ---- target normalisation: per tile (LayerNorm) or per dimension (standardize)
# --------------------------------
MEAN, STD = [1.0, -2.0, 3.0], [2.0, 0.5, 4.0]


def hand_standardize(v: list[float]) -> list[float]:
    return [(x - m) / s for x, m, s in zip(v, MEAN, STD, strict=True)]


def hand_mse(a: list[float], b: list[float]) -> float:
    return sum((x - y) ** 2 for x, y in zip(a, b, strict=True)) / len(a)


@pytest.mark.parametrize("kind", ["cosine", "mse"])
def test_standardized_targets_equal_hand_computation(kind):
    def cell(k: int) -> float:
        target = hand_standardize(TEACHER[k])
        return hand_cosine_loss(PRED[k], target) if kind == "cosine" else hand_mse(PRED[k], target)

    out = masked_context_loss(
        torch.tensor([PRED]),
        torch.tensor([TEACHER]),
        torch.tensor([MASKED]),
        torch.tensor([VALID]),
        kind=kind,
        w_masked=2.0,
        w_visible=0.5,
        target_norm="standardize",
        target_mean=torch.tensor(MEAN),
        target_std=torch.tensor(STD),
    )
    assert out["masked"].item() == pytest.approx(cell(0), rel=1e-5)
    assert out["visible"].item() == pytest.approx((cell(2) + cell(3)) / 2, rel=1e-5)


def test_mse_with_layer_norm_equals_hand_computation():
    out = run("mse", 1.0, 1.0)
    assert out["masked"].item() == pytest.approx(hand_mse(PRED[0], hand_layer_norm(TEACHER[0])), rel=1e-5)


def test_standardize_needs_statistics_and_norms_are_named():
    with pytest.raises(ValueError, match="standardize"):
        normalise_targets(torch.tensor([TEACHER]), "standardize")
    with pytest.raises(ValueError, match="target_norm"):
        normalise_targets(torch.tensor([TEACHER]), "batch_norm")


def test_mean_direction_share_against_its_formula():
    targets = torch.tensor([[3.0, 1.0], [1.0, 1.0], [2.0, -1.0]])
    mean = [2.0, 1.0 / 3.0]
    unit = [m / math.hypot(*mean) for m in mean]
    along = [(a * unit[0] + b * unit[1]) ** 2 for a, b in targets.tolist()]
    energy = sum(a * a + b * b for a, b in targets.tolist())
    assert mean_direction_share(targets) == pytest.approx(sum(along) / energy, rel=1e-9)
    assert mean_direction_share(torch.tensor([[1.0, 2.0]] * 4)) == pytest.approx(1.0)  # one shared direction


def test_layer_norm_keeps_a_shared_direction_that_standardize_removes():
    """The issue's observation on a toy teacher: features = a large common vector + small tile-specific parts.
    After LayerNorm most of the targets' energy is the common direction, and predicting that constant
    already gives a cosine near 1; standardised per dimension, the targets' mean is 0 (no shared
    direction)."""
    g = torch.Generator().manual_seed(0)
    common = torch.randn(64, generator=g) * 3 + 1
    features = common + 0.5 * torch.randn(500, 64, generator=g)  # (N, D)
    layer_normed = normalise_targets(features)
    assert mean_direction_share(layer_normed) > 0.9
    constant = layer_normed.mean(dim=0, keepdim=True).expand_as(layer_normed)
    assert F.cosine_similarity(constant, layer_normed, dim=-1).mean() > 0.9
    standardized = normalise_targets(
        features, "standardize", features.mean(0), features.std(0, unbiased=False)
    )
    assert standardized.mean(dim=0).abs().max() < 1e-5
    assert mean_direction_share(standardized) < 2 / 64  # no more than a random direction carries (~1/D)
