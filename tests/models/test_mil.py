"""MIL models: shapes, permutation and padding invariance, attention that sums to 1."""

from __future__ import annotations

import pytest
import torch

from histodistill.models.mil import MIL_MODELS, create_mil
from histodistill.models.mil_stacked import NotStackable, stack_mil, unstack_state

IN_DIM, CLASSES = 12, 3
SMALL = {"mean": {}, "abmil": {"hidden_dim": 16, "attention_dim": 8}, "transmil": {"dim": 16, "heads": 2}}


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_mil(name, IN_DIM, CLASSES, **SMALL[name]).eval()


@pytest.mark.parametrize("name", sorted(MIL_MODELS))
def test_shapes_finite_and_every_parameter_learns(name):
    model = build(name).train()
    x = torch.randn(2, 7, IN_DIM)
    out = model(x)
    assert out.logits.shape == (2, CLASSES) and out.scores.shape == (2, 7)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.scores).all()
    out.logits.sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"parameters without gradient: {missing}"


@pytest.mark.parametrize("name", ["mean", "abmil"])
def test_permutation_invariance(name):
    model = build(name)
    x = torch.randn(1, 9, IN_DIM)
    perm = torch.randperm(9)
    out, permuted = model(x), model(x[:, perm])
    torch.testing.assert_close(out.logits, permuted.logits)
    torch.testing.assert_close(out.scores[:, perm], permuted.scores)


@pytest.mark.parametrize("name", sorted(MIL_MODELS))
def test_padding_does_not_change_output(name):
    model = build(name)
    short, long = torch.randn(1, 5, IN_DIM), torch.randn(1, 8, IN_DIM)
    # Padding filled with large values: any leak into the result would show.
    padded = torch.cat([short, 100 * torch.ones(1, 3, IN_DIM)], dim=1)
    batch = torch.cat([padded, long])
    mask = torch.tensor([[True] * 5 + [False] * 3, [True] * 8])
    out = model(batch, mask)
    alone_short, alone_long = model(short), model(long)
    torch.testing.assert_close(out.logits[0], alone_short.logits[0])
    torch.testing.assert_close(out.logits[1], alone_long.logits[0])
    torch.testing.assert_close(out.scores[0, :5], alone_short.scores[0])
    assert (out.scores[0, 5:] == 0).all()


@pytest.mark.parametrize("name", ["abmil", "transmil"])
def test_attention_sums_to_one_over_real_instances(name):
    model = build(name)
    x = torch.randn(2, 6, IN_DIM)
    mask = torch.tensor([[True] * 4 + [False] * 2, [True] * 6])
    scores = model(x, mask).scores
    torch.testing.assert_close(scores.sum(dim=1), torch.ones(2))
    assert (scores >= 0).all()


@pytest.mark.parametrize("n", [1, 2, 3, 5, 10])
def test_transmil_bags_of_one_and_odd_sizes(n):
    out = build("transmil")(torch.randn(1, n, IN_DIM))
    assert out.logits.shape == (1, CLASSES) and torch.isfinite(out.logits).all()
    torch.testing.assert_close(out.scores.sum(), torch.tensor(1.0))


def test_mean_pool_logits_are_mean_of_instance_logits():
    model = build("mean")
    x = torch.randn(1, 4, IN_DIM)
    expected = model.classifier(x).mean(dim=1)
    torch.testing.assert_close(model(x).logits, expected)


def test_abmil_follows_gated_attention_formula():
    model = build("abmil")
    x = torch.randn(1, 5, IN_DIM)
    h = model.embed(x)[0]  # (N, L)
    att = model.attention
    a = torch.softmax(att.w(torch.tanh(att.V(h)) * torch.sigmoid(att.U(h))).squeeze(1), dim=0)
    out = model(x)
    torch.testing.assert_close(out.scores[0], a)
    torch.testing.assert_close(out.logits[0], model.classifier((a[:, None] * h).sum(0)))


def test_unknown_model_name():
    with pytest.raises(ValueError, match="abmil"):
        create_mil("clam", IN_DIM, CLASSES)


def test_standardized_mil_z_scores_with_fitted_statistics_and_wraps_the_model():
    torch.manual_seed(0)
    model = create_mil("abmil", 4, 2, standardize=True).eval()  # eval: no dropout
    train = torch.randn(50, 4) * torch.tensor([1.0, 10.0, 0.1, 0.0]) + torch.tensor([5.0, -3.0, 2.0, 7.0])
    model.fit(train)
    # A constant dimension keeps sd 1 instead of dividing by zero.
    assert torch.allclose(model.mean, train.mean(0)) and model.std[3] == 1.0
    assert torch.allclose(model.std[:3], train.std(0)[:3])
    x = torch.randn(1, 6, 4) * 3 + 1
    expected = model.mil((x - train.mean(0)) / torch.tensor([*train.std(0)[:3], 1.0]))
    out = model(x)
    assert torch.allclose(out.logits, expected.logits) and torch.allclose(out.scores, expected.scores)
    # The statistics travel with the state dict, so a rebuilt model predicts the same.
    rebuilt = create_mil("abmil", 4, 2, standardize=True).eval()
    rebuilt.load_state_dict(model.state_dict())
    assert torch.allclose(rebuilt(x).logits, out.logits)
    assert not isinstance(create_mil("abmil", 4, 2), type(model))


@pytest.mark.parametrize("name", ["mean", "abmil"])
def test_stacked_models_give_each_models_own_output_padding_included(name):
    models = [build(name).train() for _ in range(3)]
    for k, model in enumerate(models):  # three different models
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * k * torch.randn_like(p))
    stacked = stack_mil(models).eval()
    lengths = [(5, 8), (8, 3), (2, 6)]  # 2 bags per run, padded to 8 with large values
    x, mask = 100 * torch.ones(6, 8, IN_DIM), torch.zeros(6, 8, dtype=torch.bool)
    for slot, n in enumerate(n for pair in lengths for n in pair):
        x[slot, :n], mask[slot, :n] = torch.randn(n, IN_DIM), True
    out = stacked(x, mask)
    for slot in range(6):
        n, alone = mask[slot].sum(), models[slot // 2].eval()(x[slot : slot + 1, : mask[slot].sum()])
        torch.testing.assert_close(out.logits[slot], alone.logits[0])
        torch.testing.assert_close(out.scores[slot, :n], alone.scores[0])
    state = unstack_state(stacked, 1)
    for key, value in models[1].named_parameters():
        assert torch.equal(state[key], value), key


def test_transmil_cannot_be_stacked_and_says_why():
    with pytest.raises(NotStackable, match="TransMIL model holds its own cls_token"):
        stack_mil([build("transmil"), build("transmil")])
