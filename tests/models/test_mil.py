"""MIL models: shapes, permutation and padding invariance, attention that sums to 1; CLAM's instance loss
against its formula."""

from __future__ import annotations

import math

import pytest
import torch

from histodistill.models.clam import clam_instance_loss, clam_loss
from histodistill.models.mil import MIL_MODELS, MILOutput, create_mil
from histodistill.models.mil_stacked import NotStackable, stack_mil, unstack_state

IN_DIM, CLASSES = 12, 3
CLAM_SMALL = {"hidden_dim": 16, "attention_dim": 8, "k_sample": 2}
SMALL = {
    "mean": {},
    "abmil": {"hidden_dim": 16, "attention_dim": 8},
    "transmil": {"dim": 16, "heads": 2},
    "clam_sb": CLAM_SMALL,
    "clam_mb": CLAM_SMALL,
}


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_mil(name, IN_DIM, CLASSES, **SMALL[name]).eval()


@pytest.mark.parametrize("name", sorted(MIL_MODELS))
def test_shapes_finite_and_every_parameter_learns(name):
    model = build(name).train()
    x = torch.randn(3, 7, IN_DIM)
    out = model(x)
    assert out.logits.shape == (3, CLASSES) and out.scores.shape == (3, 7)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.scores).all()
    loss = model.loss(out, torch.arange(CLASSES))  # the model's own objective: every class's bag once
    assert loss.shape == () and torch.isfinite(loss)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"parameters without gradient: {missing}"


@pytest.mark.parametrize("name", ["mean", "abmil", "clam_sb", "clam_mb"])
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
    # The objective too: padded tiles are never among a bag's top- or bottom-k (CLAM's instance loss).
    labels = torch.tensor([1, 2])
    alone = (model.loss(alone_short, labels[:1]) + model.loss(alone_long, labels[1:])) / 2
    torch.testing.assert_close(model.loss(out, labels), alone)


@pytest.mark.parametrize("name", ["abmil", "transmil", "clam_sb", "clam_mb"])
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


def ce(logits: list[float], target: int) -> float:
    """-log softmax(logits)[target], written out."""
    return -logits[target] + math.log(sum(math.exp(v) for v in logits))


def fixed_clam_output() -> MILOutput:
    """One bag of 5 tiles (and a padded sixth), two classes, one attention branch (SB)."""
    # (1, 1, 6): top-2 = tiles 1, 3; bottom-2 = 2, 0
    attention = torch.tensor([[[0.1, 0.4, 0.05, 0.3, 0.15, 0.0]]])
    instance_logits = torch.arange(24, dtype=torch.float32).reshape(1, 6, 2, 2).sin()  # (1, 6, C=2, 2)
    mask = torch.tensor([[True] * 5 + [False]])
    return MILOutput(torch.tensor([[0.3, -0.2]]), attention[:, 0], attention, instance_logits, mask)


def test_clam_instance_loss_is_cross_entropy_of_top_k_as_class_and_bottom_k_as_not():
    out = fixed_clam_output()
    z = out.instance_logits[0].tolist()  # z[tile][classifier] = 2 logits
    # Label 1: classifier 1, tiles 1 and 3 (highest attention) -> 1, tiles 2 and 0 (lowest) -> 0; mean of 4.
    expected = (ce(z[1][1], 1) + ce(z[3][1], 1) + ce(z[2][1], 0) + ce(z[0][1], 0)) / 4
    assert clam_instance_loss(out, torch.tensor([1]), k_sample=2).item() == pytest.approx(expected, rel=1e-6)
    # Subtyping: classifier 0 (the other class) also pushes the top-2 tiles to 0; the sum over classifiers /
    # 2.
    subtyping = (expected + (ce(z[1][0], 0) + ce(z[3][0], 0)) / 2) / 2
    assert clam_instance_loss(out, torch.tensor([1]), 2, subtyping=True).item() == pytest.approx(
        subtyping, rel=1e-6
    )
    # More picks than real tiles: the padded tile is never picked; every real tile is top and bottom.
    everything = (sum(ce(z[t][0], 1) for t in range(5)) + sum(ce(z[t][0], 0) for t in range(5))) / 10
    assert clam_instance_loss(out, torch.tensor([0]), k_sample=8).item() == pytest.approx(
        everything, rel=1e-6
    )
    # The objective: 0.7 x bag cross-entropy + 0.3 x instance loss (CLAM's bag_weight).
    bag = ce([0.3, -0.2], 1)
    assert clam_loss(out, torch.tensor([1]), 0.7, 2).item() == pytest.approx(
        0.7 * bag + 0.3 * expected, rel=1e-6
    )


def test_clam_mb_uses_each_class_branch_for_its_instance_loss_and_scores_the_predicted_branch():
    out = fixed_clam_output()
    # Two branches: branch 0 ranks the tiles in reverse, so classifier 0 picks top 2, 0 and bottom 1, 3.
    reverse = torch.tensor([[[0.15, 0.05, 0.4, 0.1, 0.3, 0.0]]])
    attention = torch.cat([reverse, out.attention], dim=1)  # (1, 2, 6)
    mb = out._replace(attention=attention)
    z = out.instance_logits[0].tolist()
    expected = (ce(z[2][0], 1) + ce(z[4][0], 1) + ce(z[1][0], 0) + ce(z[3][0], 0)) / 4
    assert clam_instance_loss(mb, torch.tensor([0]), k_sample=2).item() == pytest.approx(expected, rel=1e-6)
    model = build("clam_mb")
    out = model(torch.randn(2, 5, IN_DIM))
    predicted = out.logits.argmax(1)
    torch.testing.assert_close(out.scores, out.attention[torch.arange(2), predicted])
    assert out.attention.shape == (2, CLASSES, 5) and out.instance_logits.shape == (2, 5, CLASSES, 2)


def test_clam_sb_follows_its_gated_attention_and_mb_scores_class_c_from_branch_c():
    x = torch.randn(1, 5, IN_DIM)
    for name in ("clam_sb", "clam_mb"):
        model = build(name)
        h = model.embed(x)[0]  # (N, L)
        gate = model.attention
        raw = gate.c(torch.tanh(gate.a[0](h)) * torch.sigmoid(gate.b[0](h)))  # (N, K)
        a = torch.softmax(raw, dim=0).T  # (K, N)
        out = model(x)
        torch.testing.assert_close(out.attention[0], a)
        pooled = a @ h  # (K, L)
        if name == "clam_sb":
            torch.testing.assert_close(out.logits[0], model.classifier(pooled[0]))
        else:
            w, b = model.classifier.weight, model.classifier.bias
            torch.testing.assert_close(
                out.logits[0], torch.stack([w[c] @ pooled[c] + b[c] for c in range(CLASSES)])
            )


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


@pytest.mark.parametrize("name", ["mean", "abmil", "clam_sb"])
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


def test_transmil_and_clam_mb_cannot_be_stacked_and_say_why():
    with pytest.raises(NotStackable, match="TransMIL runs each bag alone"):
        stack_mil([build("transmil"), build("transmil")])
    with pytest.raises(NotStackable, match="CLAM-MB multiplies by its classifier's weight"):
        stack_mil([build("clam_mb"), build("clam_mb")])
