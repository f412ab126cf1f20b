"""Each kd_zoo loss against its paper's formula, computed by hand with Python loops on small fixed tensors."""

import math

import pytest
import torch
import torch.nn.functional as F

from histodistill.losses.activation_boundary import ABConnectors, ab_loss
from histodistill.losses.attention_transfer import at_loss
from histodistill.losses.correlation_congruence import cc_loss, correlation_matrix
from histodistill.losses.factor_transfer import ft_loss
from histodistill.losses.fsp import fsp_loss
from histodistill.losses.nst import nst_loss
from histodistill.losses.pkt import pkt_loss
from histodistill.losses.rkd import rkd_angle_loss, rkd_distance_loss, rkd_loss
from histodistill.losses.semckd import SemCKDLoss, semckd_loss
from histodistill.losses.similarity_preserving import sp_loss
from histodistill.losses.simkd import SimKDProjector, simkd_loss
from histodistill.losses.srrl import SRRLLoss
from histodistill.losses.vid import VIDLoss


def fixed(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def unit(v):
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def dot(a, b):
    return sum(x * y for x, y in zip(a, b, strict=True))


def pool2(m):
    """Average 2×2 blocks of a nested-list (C, H, W) map."""
    return [
        [
            [sum(c[2 * i + a][2 * j + b] for a in (0, 1) for b in (0, 1)) / 4 for j in range(len(c[0]) // 2)]
            for i in range(len(c) // 2)
        ]
        for c in m
    ]


def spatial(m):
    """(C, H, W) nested list -> per-channel flat spatial vectors."""
    return [[x for row in c for x in row] for c in m]


def huber(d):
    return 0.5 * d * d if abs(d) < 1 else abs(d) - 0.5


# ---- AT ---------------------------------------------------------------------------------------------
def test_at_is_mean_squared_difference_of_normalised_attention_maps():
    s, t = fixed(2, 3, 4, 4, seed=1), fixed(2, 5, 2, 2, seed=2)  # different channels and sizes
    expected = 0.0
    for b in range(2):
        s_map = spatial(pool2(s[b].tolist()))  # the larger map is pooled to the smaller
        t_map = spatial(t[b].tolist())
        q_s = unit([sum(c[j] ** 2 for c in s_map) / 3 for j in range(4)])
        q_t = unit([sum(c[j] ** 2 for c in t_map) / 5 for j in range(4)])
        expected += sum((a - c) ** 2 for a, c in zip(q_s, q_t, strict=True))
    assert at_loss(s, t).item() == pytest.approx(expected / (2 * 4), rel=1e-5)


# ---- SP ---------------------------------------------------------------------------------------------
def test_sp_is_frobenius_distance_of_row_normalised_batch_grams_over_b_squared():
    # a map and a vector: only the batch relation counts
    s, t = (
        fixed(3, 2, 2, 2, seed=3),
        fixed(3, 7, seed=4),
    )

    def gram(x):
        rows = [r.flatten().tolist() for r in x]
        return [unit([dot(a, b) for b in rows]) for a in rows]

    g_s, g_t = gram(s), gram(t)
    expected = sum((g_s[i][j] - g_t[i][j]) ** 2 for i in range(3) for j in range(3)) / 9
    assert sp_loss(s, t).item() == pytest.approx(expected, rel=1e-5)


# ---- CC ---------------------------------------------------------------------------------------------
def test_cc_kernel_is_the_taylor_expanded_rbf_and_the_loss_its_squared_difference():
    s, t = fixed(3, 4, seed=5), fixed(3, 4, seed=6)
    gamma = 0.4

    def kernel(x):
        rows = [unit(r) for r in x.tolist()]
        return [
            [
                sum(
                    math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * dot(a, b) ** p
                    for p in range(3)
                )
                for b in rows
            ]
            for a in rows
        ]

    k_s, k_t = kernel(s), kernel(t)
    expected = sum((k_t[i][j] - k_s[i][j]) ** 2 for i in range(3) for j in range(3)) / 9
    assert cc_loss(s, t, gamma=gamma, order=2).item() == pytest.approx(expected, rel=1e-5)
    # a high order recovers the exact Gaussian kernel exp(−γ‖x − y‖²) of the unit vectors
    u = F.normalize(s, dim=1)
    torch.testing.assert_close(
        correlation_matrix(s, gamma, order=12), torch.exp(-gamma * torch.cdist(u, u) ** 2)
    )


# ---- VID --------------------------------------------------------------------------------------------
def test_vid_is_the_gaussian_negative_log_likelihood_with_per_channel_variance():
    vid = VIDLoss(2, 2, 2, init_variance=5.0)
    assert vid.variance().tolist() == pytest.approx([5.0, 5.0], rel=1e-5)  # VID's initialisation
    with torch.no_grad():  # identity regressor: μ(s) = s for s ≥ 0
        for conv in vid.regressor[::2]:
            conv.weight.copy_(torch.eye(2).view(2, 2, 1, 1))
        vid.log_scale.copy_(torch.tensor([0.3, -1.2]))
    s, t = fixed(2, 2, 2, 2, seed=7).abs(), fixed(2, 2, 2, 2, seed=8)
    variance = [math.log1p(math.exp(a)) + 1e-5 for a in (0.3, -1.2)]
    total = 0.0
    for b in range(2):
        for c in range(2):
            for i in range(2):
                for j in range(2):
                    v = variance[c]
                    total += 0.5 * (math.log(v) + (t[b, c, i, j].item() - s[b, c, i, j].item()) ** 2 / v)
    assert vid(s, t).item() == pytest.approx(total / 16, rel=1e-5)


# ---- RKD --------------------------------------------------------------------------------------------
def test_rkd_distance_and_angle_terms_by_hand():
    s, t = fixed(4, 3, seed=9), fixed(4, 5, seed=10)

    def distances(x):
        rows = x.tolist()
        d = [[math.dist(a, b) for b in rows] for a in rows]
        mu = sum(d[i][j] for i in range(4) for j in range(4) if i != j) / 12
        return [[v / mu for v in r] for r in d]

    d_s, d_t = distances(s), distances(t)
    dist = sum(huber(d_s[i][j] - d_t[i][j]) for i in range(4) for j in range(4)) / 16
    assert rkd_distance_loss(s, t).item() == pytest.approx(dist, rel=1e-4)

    def cosines(x):
        rows = x.tolist()
        out = {}
        for j in range(4):
            for i in range(4):
                for k in range(4):
                    if i == j or k == j:
                        out[j, i, k] = 0.0  # no angle at a sample with itself
                    else:
                        e_ij = unit([a - b for a, b in zip(rows[i], rows[j], strict=True)])
                        e_kj = unit([a - b for a, b in zip(rows[k], rows[j], strict=True)])
                        out[j, i, k] = dot(e_ij, e_kj)
        return out

    c_s, c_t = cosines(s), cosines(t)
    angle = sum(huber(c_s[key] - c_t[key]) for key in c_s) / 64
    assert rkd_angle_loss(s, t).item() == pytest.approx(angle, rel=1e-4)
    assert rkd_loss(s, t, 25, 50).item() == pytest.approx(25 * dist + 50 * angle, rel=1e-4)


# ---- PKT --------------------------------------------------------------------------------------------
def test_pkt_is_the_mean_kl_of_cosine_conditional_probabilities():
    s, t = fixed(3, 4, seed=11), fixed(3, 6, seed=12)

    def conditional(x):
        rows = [unit(r) for r in x.tolist()]
        k = [[(dot(a, b) + 1) / 2 for b in rows] for a in rows]
        return [[v / sum(r) for v in r] for r in k]

    p_s, p_t = conditional(s), conditional(t)
    eps = 1e-7
    expected = (
        sum(p_t[i][j] * math.log((p_t[i][j] + eps) / (p_s[i][j] + eps)) for i in range(3) for j in range(3))
        / 9
    )
    assert pkt_loss(s, t).item() == pytest.approx(expected, rel=1e-4)


# ---- AB ---------------------------------------------------------------------------------------------
def test_ab_is_the_alternative_l2_around_the_margin():
    s = torch.tensor([[[[0.5, -2.0], [1.5, -0.3]]], [[[0.0, 2.0], [-1.5, 0.9]]]])  # (2, 1, 2, 2)
    t = torch.tensor([[[[1.0, 0.0], [2.0, -1.0]]], [[[0.5, 0.0], [-0.2, 3.0]]]])
    m, total = 1.0, 0.0
    for x, y in zip(s.flatten().tolist(), t.flatten().tolist(), strict=True):
        total += max(m - x, 0) ** 2 if y > 0 else max(m + x, 0) ** 2
    assert ab_loss(s, t, m).item() == pytest.approx(total / 2, rel=1e-6)
    assert ABConnectors([1, 1, 1, 1], [1, 1, 1, 1]).layer_weights == [0.125, 0.25, 0.5, 1.0]


# ---- FT ---------------------------------------------------------------------------------------------
def test_ft_is_the_l1_distance_of_normalised_factors():
    s, t = fixed(2, 3, 2, 2, seed=13), fixed(2, 3, 2, 2, seed=14)
    total = 0.0
    for b in range(2):
        u, v = unit(s[b].flatten().tolist()), unit(t[b].flatten().tolist())
        total += sum(abs(x - y) for x, y in zip(u, v, strict=True))
    assert ft_loss(s, t).item() == pytest.approx(total / 24, rel=1e-5)


# ---- FSP --------------------------------------------------------------------------------------------
def test_fsp_matrices_and_loss_by_hand():
    s = [fixed(2, 2, 4, 4, seed=15), fixed(2, 3, 2, 2, seed=16), fixed(2, 1, 2, 2, seed=17)]
    t = [fixed(2, 2, 4, 4, seed=18), fixed(2, 3, 2, 2, seed=19), fixed(2, 1, 2, 2, seed=20)]

    def fsp(bottom, top, b, pool):
        f1 = spatial(pool2(bottom[b].tolist()) if pool else bottom[b].tolist())
        f2 = spatial(top[b].tolist())
        return [[dot(x, y) / 4 for y in f2] for x in f1]  # (C1, C2), h·w = 4

    total = 0.0
    for i, pool in ((0, True), (1, False)):
        squares = []
        for b in range(2):
            g_s, g_t = fsp(s[i], s[i + 1], b, pool), fsp(t[i], t[i + 1], b, pool)
            squares += [
                (x - y) ** 2 for rs, rt in zip(g_s, g_t, strict=True) for x, y in zip(rs, rt, strict=True)
            ]
        total += sum(squares) / len(squares)
    assert fsp_loss(s, t).item() == pytest.approx(total, rel=1e-5)


# ---- NST --------------------------------------------------------------------------------------------
def test_nst_is_the_polynomial_kernel_mmd_between_channel_patterns():
    s, t = fixed(2, 3, 2, 2, seed=21), fixed(2, 2, 2, 2, seed=22)
    total = 0.0
    for b in range(2):
        fs = [unit(c) for c in spatial(s[b].tolist())]
        ft = [unit(c) for c in spatial(t[b].tolist())]

        def k(a, c):
            return sum(dot(x, y) ** 2 for x in a for y in c) / (len(a) * len(c))

        total += k(fs, fs) + k(ft, ft) - 2 * k(fs, ft)
    assert nst_loss(s, t).item() == pytest.approx(total / 2, rel=1e-5)
    assert nst_loss(t, t).item() == pytest.approx(0.0, abs=1e-6)


# ---- SemCKD -----------------------------------------------------------------------------------------
def test_semckd_weights_each_pair_loss_by_the_layer_attention():
    per_pair = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[0.5, 0.0], [2.0, 1.0]]])  # (B=2, n_s=2, n_t=2)
    attention = torch.tensor([[[0.25, 0.75], [0.5, 0.5]], [[1.0, 0.0], [0.1, 0.9]]])
    expected = (0.25 + 1.5 + 1.5 + 2 + 0.5 + 0 + 0.2 + 0.9) / (2 * 2)
    assert semckd_loss(per_pair, attention).item() == pytest.approx(expected)
    criterion = SemCKDLoss([2, 3], [4, 5, 6], batch_size=4)
    att = criterion.attention([fixed(4, 2, 4, 4), fixed(4, 3, 2, 2)], [fixed(4, c, 2, 2) for c in (4, 5, 6)])
    assert att.shape == (4, 2, 3)
    torch.testing.assert_close(att.sum(-1), torch.ones(4, 2))


# ---- SimKD, SRRL ------------------------------------------------------------------------------------
def test_simkd_is_mse_to_the_teacher_map_and_predicts_with_the_teacher_classifier():
    torch.manual_seed(0)
    projector = SimKDProjector(3, 4).eval()
    classifier = torch.nn.Linear(4, 2)
    s, t = fixed(2, 3, 2, 2, seed=23), fixed(2, 4, 2, 2, seed=24)
    projected = projector(s)
    assert simkd_loss(projected, t).item() == pytest.approx(((projected - t) ** 2).mean().item(), rel=1e-6)
    pooled = projected.mean(dim=(2, 3))
    torch.testing.assert_close(
        projector.predict(s, classifier), pooled @ classifier.weight.T + classifier.bias
    )


def test_srrl_is_feature_mse_plus_mse_of_the_teacher_classifier_outputs():
    torch.manual_seed(0)
    srrl = SRRLLoss(3, 4).eval()
    classifier = torch.nn.Linear(4, 2)
    s, t, z = fixed(5, 3, seed=25), fixed(5, 4, seed=26), fixed(5, 2, seed=27)
    bn = srrl.transfer[1]
    regressed = torch.relu(
        (s @ srrl.transfer[0].weight.T - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight
        + bn.bias
    )
    expected = ((regressed - t) ** 2).mean() + (
        (regressed @ classifier.weight.T + classifier.bias - z) ** 2
    ).mean()
    assert srrl(s, t, classifier, z).item() == pytest.approx(expected.item(), rel=1e-5)


# ---- layer pairs of different sizes ------------------------------------------------------------------
def test_the_larger_map_is_average_pooled_to_the_smaller_as_repdistillers_at_and_nst():
    # RepDistiller/MoMA AT and NST: if s_H > t_H: f_s = adaptive_avg_pool2d(f_s, (t_H, t_H)), else the
    # teacher.
    from histodistill.losses.spatial import match_spatial

    big = torch.arange(16.0).view(1, 1, 4, 4)
    small = torch.zeros(1, 1, 2, 2)
    by_hand = [[(0 + 1 + 4 + 5) / 4, (2 + 3 + 6 + 7) / 4], [(8 + 9 + 12 + 13) / 4, (10 + 11 + 14 + 15) / 4]]
    pooled, same = match_spatial(big, small)
    assert pooled[0, 0].tolist() == by_hand and same is small
    same, pooled = match_spatial(small, big)
    assert pooled[0, 0].tolist() == by_hand and same is small
