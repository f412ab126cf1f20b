"""Classification metrics shared by training validation, probes and MIL, and the confusion figure.

`classification_metrics` takes class probabilities, so the threshold-free AUROC and the
argmax-based scores come from one call. A class absent from ``y_true`` (common in small
validation folds) does not break anything: accuracy, balanced accuracy (mean recall over the
classes present), macro-F1 (over all ``num_classes``, as scikit-learn with ``labels=range(C)``:
an absent class that is never predicted scores 0) and kappa are computed as usual; the one-vs-rest
AUROC is averaged over the classes present in ``y_true`` that also have negatives, and is NaN when
fewer than two classes are present.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")  # figures are written to files; never open a window (CI, SLURM nodes)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy.stats import rankdata  # noqa: E402
from sklearn.metrics import (  # noqa: E402
    balanced_accuracy_score,
    cohen_kappa_score,
    confusion_matrix,
    f1_score,
)

from histodistill.io import atomic_path  # noqa: E402

METRIC_NAMES = ("accuracy", "balanced_accuracy", "macro_f1", "auroc", "kappa_qw")


def binary_aurocs(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """AUROC of each row: ``labels`` (B, n) 0/1 with both classes in every row, ``scores`` (..., B, n)
    -> (..., B). The Mann-Whitney U statistic over ranks, tied scores sharing their average rank, which
    is the trapezoidal ROC area that sklearn's ``roc_auc_score`` computes, without its per-call checks
    (milliseconds each, when a bootstrap or a training loop calls it thousands of times)."""
    ranks = rankdata(scores, axis=-1)
    positives = labels.sum(-1)
    negatives = labels.shape[-1] - positives
    return ((ranks * labels).sum(-1) - positives * (positives + 1) / 2) / (positives * negatives)


def ovr_auroc(y_true: np.ndarray, probs: np.ndarray) -> float:
    """One-vs-rest AUROC from labels (N,) and probabilities (N, C), NaN if fewer than two classes are
    present. Binary (C = 2): the AUROC of class 1. Otherwise: the mean over the classes present."""
    y_true = np.asarray(y_true)
    present = np.unique(y_true)
    if len(present) < 2:
        return float("nan")
    if probs.shape[1] == 2:
        return float(binary_aurocs((y_true == 1)[None], probs[None, :, 1])[0])
    # (K, N) -> (K,)
    return float(np.mean(binary_aurocs(y_true[None] == present[:, None], probs[:, present].T)))


def ovr_aurocs(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """`ovr_auroc` of each row: ``labels`` (B, n) class indices with every class in every row,
    ``probs`` (..., B, n, C) -> (..., B). Binary (C = 2): the AUROC of class 1; otherwise the mean of the
    C one-vs-rest AUROCs."""
    num_classes = probs.shape[-1]
    if num_classes == 2:
        return binary_aurocs(labels == 1, probs[..., 1])
    return np.mean([binary_aurocs(labels == c, probs[..., c]) for c in range(num_classes)], axis=0)


def bootstrap_picks(labels: np.ndarray, n_boot: int = 2000, seed: int = 0) -> np.ndarray:
    """(n_boot, S) indices of ``n_boot`` resamples (with replacement) of the S items of ``labels`` (S,),
    each holding every class that ``labels`` holds (a resample without one is drawn again, so that its
    AUROC is defined). Seeded: the same labels and seed give the same resamples."""
    labels = np.asarray(labels)
    classes = np.unique(labels)
    rng = np.random.default_rng(seed)
    picks: list[np.ndarray] = []
    while len(picks) < n_boot:
        pick = rng.integers(len(labels), size=(n_boot, len(labels)))  # (n_boot, S)
        complete = np.all([(labels[pick] == c).any(axis=1) for c in classes], axis=0)
        picks.extend(pick[complete][: n_boot - len(picks)])
    return np.array(picks)


def _class_probs(probs: np.ndarray) -> np.ndarray:
    """(R, S) probabilities of the positive class -> (R, S, 2) class probabilities; (R, S, C) unchanged."""
    probs = np.asarray(probs, dtype=np.float64)
    return np.stack([1 - probs, probs], axis=-1) if probs.ndim == 2 else probs


def bootstrap_auroc(
    labels: np.ndarray, probs: np.ndarray, n_boot: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """``(mean AUROC, CI low, CI high)`` for ``labels`` (S,) class indices (0/1 when binary) and ``probs``
    of R repeats of the same S items (CV seeds): (R, S) probabilities of the positive class, or (R, S, C)
    class probabilities (AUROC one-vs-rest, `ovr_auroc`). The point is the mean over repeats of each
    repeat's AUROC; the CI is the 2.5 / 97.5 % percentile of that mean over resampled items
    (`bootstrap_picks`: the same resampled items for every repeat)."""
    labels, probs = np.asarray(labels), _class_probs(probs)
    point = float(ovr_aurocs(labels[None], probs).mean())
    picks = bootstrap_picks(labels, n_boot, seed)
    values = ovr_aurocs(labels[picks], probs[:, picks]).mean(0)  # (R, n_boot) -> (n_boot,)
    low, high = np.percentile(values, [2.5, 97.5])
    return point, float(low), float(high)


@dataclass
class PairedAUROC:
    """Two models' AUROCs on the same items, and their difference (b - a) and ratio (b / a), each as
    ``(point, CI low, CI high)``."""

    a: tuple[float, float, float]
    b: tuple[float, float, float]
    difference: tuple[float, float, float]
    ratio: tuple[float, float, float]


def paired_bootstrap_auroc(
    labels: np.ndarray, probs_a: np.ndarray, probs_b: np.ndarray, n_boot: int = 2000, seed: int = 0
) -> PairedAUROC:
    """AUROCs of models a and b scored on the same items, with 95 % percentile CIs of b - a and b / a from
    ONE resampling of the items: each resample scores both models on the same items, so what the two
    share (which items are hard) cancels out of the difference instead of widening its CI.

    ``labels`` (S,) class indices; ``probs_a``, ``probs_b``: (R, S) positive-class or (R, S, C) class
    probabilities (R repeats, e.g. CV seeds; each model's AUROC is its mean over repeats, as in
    `bootstrap_auroc`; R may differ between the two)."""
    labels = np.asarray(labels)
    probs = [_class_probs(probs_a), _class_probs(probs_b)]
    picks = bootstrap_picks(labels, n_boot, seed)
    point = [float(ovr_aurocs(labels[None], p).mean()) for p in probs]
    a, b = (ovr_aurocs(labels[picks], p[:, picks]).mean(0) for p in probs)  # (n_boot,) each

    def interval(value: float, samples: np.ndarray) -> tuple[float, float, float]:
        low, high = np.percentile(samples, [2.5, 97.5])
        return value, float(low), float(high)

    return PairedAUROC(
        interval(point[0], a),
        interval(point[1], b),
        interval(point[1] - point[0], b - a),
        interval(point[1] / point[0], b / a),
    )


def classification_metrics(
    y_true: Sequence[int] | np.ndarray, probs: np.ndarray, num_classes: int
) -> dict[str, float]:
    """``accuracy``, ``balanced_accuracy``, ``macro_f1``, ``auroc`` (one-vs-rest), ``kappa_qw``
    (quadratic-weighted Cohen's kappa) from labels (N,) and class probabilities (N, C)."""
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape != (len(y_true), num_classes):
        raise ValueError(f"probs must be (N={len(y_true)}, C={num_classes}), got {probs.shape}")
    y_pred = probs.argmax(axis=1)
    labels = np.arange(num_classes)
    if len(np.unique(np.concatenate([y_true, y_pred]))) == 1:
        kappa = 1.0  # perfect agreement on a single class: sklearn would return NaN (0/0)
    else:
        kappa = float(cohen_kappa_score(y_true, y_pred, labels=labels, weights="quadratic"))
    return {
        "accuracy": float((y_pred == y_true).mean()),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "auroc": ovr_auroc(y_true, probs),
        "kappa_qw": kappa,
    }


def plot_confusion(
    y_true: Sequence[int] | np.ndarray,
    y_pred: Sequence[int] | np.ndarray,
    class_names: Sequence[str],
    path: str | os.PathLike,
    title: str = "",
) -> None:
    """Save a confusion-matrix PNG (rows: true class, columns: predicted; counts and row-normalised
    colour) atomically to ``path``."""
    counts = confusion_matrix(y_true, y_pred, labels=np.arange(len(class_names)))  # (C, C)
    row_sums = counts.sum(axis=1, keepdims=True)
    recall = np.divide(counts, row_sums, out=np.zeros(counts.shape, float), where=row_sums > 0)
    size = 1.5 + 0.5 * len(class_names)
    figure, axes = plt.subplots(figsize=(size + 1, size))
    image = axes.imshow(recall, cmap="Blues", vmin=0, vmax=1)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="fraction of the true class")
    ticks = np.arange(len(class_names))
    axes.set_xticks(ticks, class_names, rotation=45, ha="right")
    axes.set_yticks(ticks, class_names)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    for (row, col), count in np.ndenumerate(counts):
        axes.text(
            col,
            row,
            str(count),
            ha="center",
            va="center",
            color="white" if recall[row, col] > 0.5 else "black",
        )
    if title:
        axes.set_title(title)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=120)
    plt.close(figure)


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear centred kernel alignment of two representations of the same N items, ``x`` (N, D1) and ``y``
    (N, D2): ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F) with column-centred Xc, Yc (Kornblith et al.
    2019, eq. 5). 1 for representations equal up to rotation and isotropic scaling; needs no map between D1
    and D2."""
    x = np.asarray(x, np.float64) - np.mean(x, axis=0)
    y = np.asarray(y, np.float64) - np.mean(y, axis=0)
    cross = np.linalg.norm(y.T @ x) ** 2
    return float(cross / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))
