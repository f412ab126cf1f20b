"""Slide-task scores of one extractor from its MIL runs (`histodistill.eval.mil_cv`: one run per CV seed).

- **slide AUROC**: per seed, the AUROC of the out-of-fold probabilities of all slides (every slide is
  tested exactly once per seed); the figure is the mean over seeds, and its 95 % CI is a percentile
  bootstrap over slides (the same resampled slides for every seed, AUROC averaged over seeds);
- **balanced accuracy**: of the out-of-fold predictions (argmax), mean over seeds;
- **localisation AUROC**: per positive slide, the AUROC of its out-of-fold instance scores against the
  exact tumour tiles (``tumour`` maps a slide id and its coords to (N,) bool); mean over slides and seeds;
- **tile-probe AUROC** (`tile_probe_auroc`): no MIL at all. A linear probe told every tile's true label
  (tumour or not), cross-validated by slide: how far the features alone separate tumour tiles. A low
  slide AUROC with a high tile-probe AUROC puts the limit in the weak slide labels and the MIL head; a low
  tile-probe AUROC puts it in the features.

Pooled out-of-fold AUROC rather than the mean of per-fold AUROCs: a test fold of a dozen slides moves
its AUROC by 0.1 per slide, and the pooled figure is what the bootstrap CI describes.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import h5py
import numpy as np
from sklearn.metrics import balanced_accuracy_score, roc_auc_score
from sklearn.model_selection import GroupKFold

from histodistill.data.feature_files import load_slides, open_feature_folder
from histodistill.eval.metrics import bootstrap_auroc
from histodistill.eval.probe import linear_probe


def read_predictions(run_dir: str | os.PathLike, positive: str) -> dict[str, tuple[int, float]]:
    """``{slide_id: (label is positive, probability of positive)}`` from a run's predictions.csv."""
    with open(Path(run_dir) / "predictions.csv", newline="") as handle:
        return {
            row["slide_id"]: (int(row["label"] == positive), float(row[f"prob_{positive}"]))
            for row in csv.DictReader(handle)
        }


def localisation_aurocs(
    run_dir: str | os.PathLike, positives: Sequence[str], tumour: Callable[[str, np.ndarray], np.ndarray]
) -> list[float]:
    """Per positive slide with both tumour and benign tiles: AUROC of its instance scores for tumour."""
    values = []
    for slide_id in positives:
        with h5py.File(Path(run_dir) / "attention" / f"{slide_id}.h5", "r") as handle:
            coords, scores = handle["coords"][:], handle["scores"][:]
        truth = tumour(slide_id, coords)
        if 0 < truth.sum() < len(truth):
            values.append(float(roc_auc_score(truth, scores)))
    return values


def slide_task_scores(
    run_dirs: Sequence[str | os.PathLike],
    tumour: Callable[[str, np.ndarray], np.ndarray],
    positive: str = "positive",
    n_boot: int = 2000,
) -> dict:
    """Scores of one extractor over its MIL runs (one per CV seed, same slides): ``auroc``,
    ``auroc_ci`` [low, high], ``auroc_per_seed``, ``balanced_accuracy``, ``localisation_auroc``,
    ``slides``."""
    runs = [read_predictions(run, positive) for run in run_dirs]
    slides = sorted(runs[0])
    labels = np.array([runs[0][s][0] for s in slides])
    probs = np.array([[run[s][1] for s in slides] for run in runs])  # (R, S)
    auroc, low, high = bootstrap_auroc(labels, probs, n_boot)
    positives = [s for s, y in zip(slides, labels, strict=True) if y]
    localisation = [v for run in run_dirs for v in localisation_aurocs(run, positives, tumour)]
    return {
        "auroc": round(auroc, 4),
        "auroc_ci": [round(low, 4), round(high, 4)],
        "auroc_per_seed": [round(float(roc_auc_score(labels, p)), 4) for p in probs],
        "balanced_accuracy": round(
            float(np.mean([balanced_accuracy_score(labels, p > 0.5) for p in probs])), 4
        ),
        "localisation_auroc": round(float(np.mean(localisation)), 4) if localisation else None,
        "slides": len(slides),
    }


def tile_probe_auroc(
    features_dir: str | os.PathLike,
    slide_ids: Sequence[str],
    tumour: Callable[[str, np.ndarray], np.ndarray],
    folds: int = 5,
    seed: int = 0,
) -> float:
    """AUROC for tumour of every tile of ``slide_ids`` (benign slides' tiles are all negatives), each scored
    by `histodistill.eval.probe.linear_probe` (standardised logistic regression, C by inner CV) trained on
    the tiles of the other folds' slides: ``folds`` folds by slide (GroupKFold), so no slide is both
    trained and scored. ``tumour`` maps a slide id and its coords (N, 2) to (N,) bool, the exact mask.

    Raises `UserError` (through `load_slides`) when a slide has no usable features file."""
    slides = load_slides(open_feature_folder(features_dir), slide_ids)
    features = np.concatenate([slides[s].features for s in slide_ids])  # (sum of N, D)
    truth = np.concatenate([tumour(s, slides[s].coords) for s in slide_ids]).astype(np.int64)  # (sum of N,)
    groups = np.concatenate([np.full(slides[s].n_tiles, i) for i, s in enumerate(slide_ids)])
    scores = np.zeros(len(truth))
    for train, test in GroupKFold(folds, shuffle=True, random_state=seed).split(features, truth, groups):
        scores[test] = linear_probe(
            features[train], truth[train], features[test], truth[test], seed=seed, num_classes=2
        ).probs[:, 1]
    return float(roc_auc_score(truth, scores))
