"""Classification metrics against hand-computed values and scikit-learn; the confusion figure."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score, f1_score, roc_auc_score

from histodistill.eval.metrics import classification_metrics, ovr_auroc, plot_confusion


def test_hand_computed_binary_case():
    y = [0, 0, 1, 1]
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.3, 0.7], [0.8, 0.2]])  # predictions 0, 1, 1, 0
    m = classification_metrics(y, probs, 2)
    assert m["accuracy"] == 0.5 and m["balanced_accuracy"] == 0.5
    assert m["macro_f1"] == pytest.approx(0.5)  # each class: precision 1/2, recall 1/2
    # Positive scores 0.7, 0.2 vs negative 0.1, 0.6: pairs won (0.7>0.1, 0.7>0.6, 0.2>0.1) = 3 of 4.
    assert m["auroc"] == pytest.approx(0.75)
    # Observed agreement 0.5, chance agreement 0.5 -> kappa 0.
    assert m["kappa_qw"] == pytest.approx(0.0)


def test_multiclass_matches_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 60)
    probs = rng.dirichlet(np.ones(4), 60)
    m = classification_metrics(y, probs, 4)
    pred = probs.argmax(1)
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert m["kappa_qw"] == pytest.approx(cohen_kappa_score(y, pred, weights="quadratic"))
    assert m["auroc"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"))


def test_a_class_missing_from_the_labels_is_tolerated():
    y = np.array([0, 0, 1, 1])  # class 2 absent
    probs = np.array([[0.8, 0.1, 0.1], [0.2, 0.2, 0.6], [0.1, 0.8, 0.1], [0.3, 0.6, 0.1]])
    m = classification_metrics(y, probs, 3)
    expected_auroc = (roc_auc_score(y == 0, probs[:, 0]) + roc_auc_score(y == 1, probs[:, 1])) / 2
    assert m["auroc"] == pytest.approx(expected_auroc)
    assert m["accuracy"] == 0.75 and all(math.isfinite(v) for v in m.values())
    single = classification_metrics([1, 1], np.array([[0.1, 0.9, 0.0], [0.2, 0.8, 0.0]]), 3)
    assert math.isnan(single["auroc"]) and single["kappa_qw"] == 1.0 and single["accuracy"] == 1.0


def test_wrong_probability_shape_is_rejected():
    with pytest.raises(ValueError, match="probs must be"):
        classification_metrics([0, 1], np.zeros((2, 3)), 2)


def test_plot_confusion_writes_a_png(tmp_path):
    path = tmp_path / "figures" / "confusion.png"
    plot_confusion([0, 1, 2, 2], [0, 2, 2, 2], ["a", "b", "c"], path, title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_ovr_auroc_equals_sklearn_with_ties_binary_and_multiclass():
    rng = np.random.default_rng(3)
    y2, y4 = rng.integers(0, 2, 40), rng.integers(0, 4, 40)
    p2 = np.round(rng.dirichlet(np.ones(2), 40), 1)  # rounded: many tied scores
    p4 = np.round(rng.dirichlet(np.ones(4), 40), 1)
    assert ovr_auroc(y2, p2) == pytest.approx(roc_auc_score(y2, p2[:, 1]), abs=1e-12)
    expected = np.mean([roc_auc_score(y4 == c, p4[:, c]) for c in range(4)])
    assert ovr_auroc(y4, p4) == pytest.approx(expected, abs=1e-12)


def test_linear_cka_is_one_under_rotation_and_scaling_and_low_for_unrelated_features():
    from scipy.stats import ortho_group

    from histodistill.eval.metrics import linear_cka

    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 6))
    rotated = 3.0 * x @ ortho_group.rvs(6, random_state=1) + 5.0  # rotation, isotropic scale, shift
    assert linear_cka(x, rotated) == pytest.approx(1.0)
    assert linear_cka(x, rng.normal(size=(200, 4))) < 0.1
    # The formula on a case worked by hand: x = (-1, 0, 1), y = (-1, 0, 1)^2 centred = (1/3, -2/3, 1/3):
    # orthogonal.
    assert linear_cka(np.array([[-1.0], [0.0], [1.0]]), np.array([[1.0], [0.0], [1.0]])) == pytest.approx(0.0)
