"""Slide-task scores: pooled out-of-fold AUROC over seeds with a bootstrap CI, balanced accuracy,
localisation."""

from __future__ import annotations

import csv

import h5py
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from histodistill.eval.metrics import binary_aurocs
from histodistill.eval.probe import linear_probe
from histodistill.eval.slide_task import bootstrap_auroc, slide_task_scores, tile_probe_auroc


def _write_run(
    run, probs: dict[str, float], labels: dict[str, str], attention: dict[str, np.ndarray]
) -> None:
    run.mkdir(parents=True)
    with open(run / "predictions.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["slide_id", "label", "prob_negative", "prob_positive", "fold"])
        writer.writerows([s, labels[s], 1 - p, p, 0] for s, p in probs.items())
    (run / "attention").mkdir()
    for slide_id, scores in attention.items():
        with h5py.File(run / "attention" / f"{slide_id}.h5", "w") as handle:
            handle["coords"] = np.stack([np.arange(len(scores)) * 64, np.zeros(len(scores), int)], 1)
            handle["scores"] = scores


def test_scores_pool_out_of_fold_predictions_and_localise_against_the_mask(tmp_path):
    labels = {"a": "negative", "b": "negative", "c": "positive", "d": "positive"}
    # seed 0 ranks perfectly; seed 1 swaps b and c (AUROC 0.75)
    _write_run(
        tmp_path / "s0",
        {"a": 0.1, "b": 0.2, "c": 0.8, "d": 0.9},
        labels,
        {"c": np.array([0.1, 0.7, 0.2]), "d": np.array([0.5, 0.4, 0.1])},
    )
    _write_run(
        tmp_path / "s1",
        {"a": 0.1, "b": 0.6, "c": 0.4, "d": 0.9},
        labels,
        {"c": np.array([0.1, 0.7, 0.2]), "d": np.array([0.5, 0.4, 0.1])},
    )

    def tumour(slide_id, coords):  # tile 1 of c and tile 0 of d are tumour
        return np.arange(len(coords)) == (1 if slide_id == "c" else 0)

    scores = slide_task_scores([tmp_path / "s0", tmp_path / "s1"], tumour, n_boot=200)
    assert scores["auroc_per_seed"] == [1.0, 0.75]
    assert scores["auroc"] == pytest.approx(0.875)
    assert scores["balanced_accuracy"] == pytest.approx((1.0 + 0.5) / 2)  # seed 1: b and c wrong at 0.5
    assert scores["localisation_auroc"] == 1.0  # the attention ranks the tumour tile first on both
    low, high = scores["auroc_ci"]
    assert low <= scores["auroc"] <= high and scores["slides"] == 4


def test_bootstrap_ci_narrows_with_more_slides_and_centres_on_the_auroc():
    rng = np.random.default_rng(0)

    def ci_width(n):
        labels = np.arange(n) % 2
        probs = labels + rng.normal(0, 1.0, n)  # a moderate signal
        point, low, high = bootstrap_auroc(labels, probs[None], n_boot=500)
        assert low < point < high
        return high - low

    assert ci_width(400) < ci_width(40) / 2


def test_binary_aurocs_equal_sklearn_on_every_row_with_ties():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, size=(300, 17))
    labels[:, :2] = [0, 1]  # both classes in every row
    scores = rng.integers(0, 5, size=(3, 300, 17)) / 4  # few distinct values: many ties
    expected = [[roc_auc_score(y, p) for y, p in zip(labels, repeat, strict=True)] for repeat in scores]
    np.testing.assert_allclose(binary_aurocs(labels, scores), expected, rtol=0, atol=1e-12)


def test_bootstrap_ci_is_the_one_of_the_per_resample_sklearn_loop():
    labels = np.array([0, 0, 1, 0, 0, 1, 0])  # 7 slides, 2 positive: about 1 resample in 10 is one-class
    rng = np.random.default_rng(2)
    probs = np.round(labels + rng.normal(0, 1.2, (3, len(labels))), 1)  # (R, S) with ties
    draw, values = np.random.default_rng(5), []
    while len(values) < 300:  # the former implementation: redraw one-class resamples, sklearn per resample
        pick = draw.integers(len(labels), size=len(labels))
        if labels[pick].min() == labels[pick].max():
            continue
        values.append(np.mean([roc_auc_score(labels[pick], p[pick]) for p in probs]))
    expected = np.percentile(values, [2.5, 97.5])
    point, low, high = bootstrap_auroc(labels, probs, n_boot=300, seed=5)
    assert point == pytest.approx(np.mean([roc_auc_score(labels, p) for p in probs]))
    np.testing.assert_allclose([low, high], expected, rtol=0, atol=1e-12)


def _write_features(folder, slides: dict[str, np.ndarray]) -> None:
    folder.mkdir()
    for slide_id, features in slides.items():
        with h5py.File(folder / f"{slide_id}.h5", "w") as handle:
            handle["features"] = features.astype(np.float32)
            handle["coords"] = np.stack([np.arange(len(features)) * 64, np.zeros(len(features), int)], 1)


def test_tile_probe_finds_tumour_tiles_the_features_carry(tmp_path):
    rng = np.random.default_rng(0)
    # tumour tiles on odd slides
    truth = {f"s{i}": rng.random(20) < (0.3 if i % 2 else 0.0) for i in range(10)}
    features = {s: rng.normal(0, 1, (20, 6)) + 3.0 * t[:, None] * np.eye(6)[0] for s, t in truth.items()}
    _write_features(tmp_path / "f", features)
    score = tile_probe_auroc(tmp_path / "f", list(truth), lambda s, coords: truth[s][coords[:, 0] // 64])
    assert score > 0.95


def test_tile_probe_scores_no_tile_of_a_slide_it_trained_on(tmp_path):
    """Every slide has its own feature offset and is all tumour or all benign: a probe that saw a slide's
    tiles would recognise the slide (a linear model can tell 40 offsets apart in 64 dimensions); one that
    never scores a training slide has nothing to go on."""
    rng = np.random.default_rng(1)
    offsets = rng.normal(0, 3, (40, 64))
    features = {f"s{i}": offsets[i] + rng.normal(0, 0.3, (16, 64)) for i in range(40)}
    _write_features(tmp_path / "f", features)

    def tumour(slide_id, coords):
        return np.full(len(coords), int(slide_id[1:]) % 2 == 1)

    assert 0.3 < tile_probe_auroc(tmp_path / "f", list(features), tumour) < 0.7
    # The same probe trained and scored on the same slides reads the slide off its offset.
    x = np.concatenate(list(features.values()))
    y = np.repeat(np.arange(40) % 2, 16)
    assert roc_auc_score(y, linear_probe(x, y, x, y, num_classes=2).probs[:, 1]) > 0.95
