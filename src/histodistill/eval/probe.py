"""Frozen-feature probes: how good are a backbone's features for a labelled patch task?

- linear: logistic regression (scikit-learn) on standardised features; the inverse regularisation ``C``
  is picked by 3-fold inner cross-validation on the training split over ``C_GRID`` unless fixed.
- linear, ``linear_protocol="mae"``: MAE's / SD-MAE's own protocol (`mae_linear_probe`, from
  ``main_linprobe.py`` / ``run_mae_eval_linear.py``): BatchNorm1d(affine=False) + Linear trained by SGD
  for 90 epochs, the number comparable with those papers; `train_mae_head` is its training loop, shared
  with the probe on augmented images (`histodistill.eval.image_probe`).
- kNN: DINO's weighted vote (Caron et al. 2021): cosine similarity to the training features, the ``k=20``
  nearest vote for their class with weight ``exp(similarity / T)``, ``T=0.07``; class probabilities are
  the normalised votes.

Both return a `ProbeResult` whose metrics come from `histodistill.eval.metrics.classification_metrics`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

from histodistill.data.bags import class_names, read_labels
from histodistill.data.feature_files import (
    FEATURES,
    PATCH_FEATURES,
    load_slides,
    non_finite_rows,
    open_feature_folder,
    shown,
)
from histodistill.data.labels import class_order, clean_labels
from histodistill.data.table import read_table
from histodistill.errors import ConfigError, UserError
from histodistill.eval.metrics import classification_metrics
from histodistill.optim.optimizer import OptimConfig, build_optimizer, build_scheduler, scaled_lr

C_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
INNER_FOLDS = 3


@dataclass
class ProbeResult:
    """Metrics on the test split and the class probabilities (N_test, C) they were computed from."""

    metrics: dict[str, float]
    probs: np.ndarray

    @property
    def predictions(self) -> np.ndarray:
        return self.probs.argmax(axis=1)


@dataclass
class PatchFeatures:
    """``features`` (N, D) float32, ``labels`` (N,) int64, ``paths`` (N,) and class names; ``groups`` (N,)
    (case ids of slide embeddings) keeps each group within one cross-validation part."""

    features: np.ndarray
    labels: np.ndarray
    paths: np.ndarray
    classes: list[str]
    groups: np.ndarray | None = None


def linear_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    seed: int = 0,
    C: float | None = None,
    num_classes: int | None = None,
) -> ProbeResult:
    """Logistic regression on standardised features; ``C=None`` chooses it by inner CV on the train split."""
    num_classes = num_classes or int(max(train_y.max(), test_y.max())) + 1
    model = _fit_logistic(train_x, train_y, seed, C)
    probs = np.zeros((len(test_x), num_classes))
    probs[:, model.classes_] = model.predict_proba(test_x)  # classes absent from train keep probability 0
    return ProbeResult(classification_metrics(test_y, probs, num_classes), probs)


def _fit_logistic(train_x: np.ndarray, train_y: np.ndarray, seed: int, C: float | None):
    """StandardScaler + logistic regression fitted on (N, D) features; ``C=None`` picks C by inner CV."""
    inner = min(INNER_FOLDS, int(np.bincount(train_y).min(initial=0) if len(train_y) else 0))
    if C is None and inner >= 2:
        # Inner folds need at least two samples of every class; otherwise C falls back to 1.0.
        classifier = LogisticRegressionCV(
            Cs=list(C_GRID),
            cv=StratifiedKFold(inner, shuffle=True, random_state=seed),
            max_iter=2000,
            random_state=seed,
        )
    else:
        classifier = LogisticRegression(C=1.0 if C is None else C, max_iter=2000, random_state=seed)
    return make_pipeline(StandardScaler(), classifier).fit(train_x, train_y)


def linear_classifier(train_x: np.ndarray, train_y: np.ndarray, num_classes: int, seed: int = 0) -> nn.Linear:
    """The linear probe's classifier (`linear_probe`'s model, fitted on all of ``train_x`` (N, D)) as one
    ``nn.Linear(D, num_classes)`` on raw features: the scaler folded into the weights, ``W / s`` and
    ``b - W·(m / s)``. Its logits equal the probe's decision function; classes absent from ``train_y`` get
    a bias of -1e4 (probability ~0, as in the probe). Used to give a self-supervised teacher the classifier
    that logit KD needs."""
    model = _fit_logistic(train_x, train_y, seed, None)
    scaler, logistic = model[0], model[-1]
    coef, intercept = logistic.coef_, logistic.intercept_  # (C', D), (C',); binary: (1, D)
    if len(logistic.classes_) == 2:  # sklearn's binary form: one logit; as two, softmax gives the same odds
        coef, intercept = (
            np.concatenate([-coef / 2, coef / 2]),
            np.concatenate([-intercept / 2, intercept / 2]),
        )
    weight = np.zeros((num_classes, train_x.shape[1]))
    bias = np.full(num_classes, -1e4)
    weight[logistic.classes_] = coef / scaler.scale_
    bias[logistic.classes_] = intercept - (coef * (scaler.mean_ / scaler.scale_)).sum(axis=1)
    layer = nn.Linear(train_x.shape[1], num_classes)
    with torch.no_grad():
        layer.weight.copy_(torch.as_tensor(weight, dtype=torch.float32))
        layer.bias.copy_(torch.as_tensor(bias, dtype=torch.float32))
    return layer


def knn_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    seed: int = 0,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk: int = 1024,
) -> ProbeResult:
    """DINO's temperature-weighted cosine kNN. ``seed`` is accepted for symmetry: the vote is
    deterministic."""
    num_classes = num_classes or int(max(train_y.max(), test_y.max())) + 1
    train = torch.nn.functional.normalize(torch.as_tensor(train_x, dtype=torch.float32), dim=1)  # (Ntr, D)
    labels = torch.as_tensor(train_y, dtype=torch.long)
    k = min(k, len(train))
    probs = []
    for start in range(0, len(test_x), chunk):
        test = torch.nn.functional.normalize(
            torch.as_tensor(test_x[start : start + chunk], dtype=torch.float32), dim=1
        )
        similarity, index = (test @ train.T).topk(k, dim=1)  # (B, k)
        weights = (similarity / temperature).exp()  # (B, k)
        votes = torch.zeros(len(test), num_classes).scatter_add_(1, labels[index], weights)  # (B, C)
        probs.append(votes / votes.sum(dim=1, keepdim=True))
    probs = torch.cat(probs).numpy() if probs else np.zeros((0, num_classes))
    return ProbeResult(classification_metrics(test_y, probs, num_classes), probs)


# main_linprobe.py / run_mae_eval_linear.py defaults: --epochs 90, --warmup_epochs 10, --batch_size 512 (per
# GPU),
# --blr 0.1 (lr = blr x batch / 256).
EPOCHS, WARMUP_EPOCHS, BATCH_SIZE, BASE_LR = 90, 10, 512, 0.1


def mae_batch_orders(n: int, batch_size: int, epochs: int, seed: int) -> list[torch.Tensor]:
    """Per epoch, the shuffled sample indices (steps, batch) of `train_mae_head`: ``min(batch_size, n)``
    per step, the incomplete last batch dropped (``drop_last=True``), reshuffled each epoch from ``seed``."""
    batch = min(batch_size, n)
    steps = n // batch
    generator = torch.Generator().manual_seed(seed)
    return [torch.randperm(n, generator=generator)[: steps * batch].view(steps, batch) for _ in range(epochs)]


def train_mae_head(
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    dim: int,
    num_classes: int,
    batch: int,
    steps_per_epoch: int,
    seed: int = 0,
    epochs: int = EPOCHS,
    warmup_epochs: int = WARMUP_EPOCHS,
    base_lr: float = BASE_LR,
    device: torch.device | str = "cpu",
) -> nn.Sequential:
    """Train MAE's linear-probe head on ``batches``: ``epochs x steps_per_epoch`` pairs of features (B, D)
    and labels (B,), on ``device``; returns the head in eval mode.

    Head: BatchNorm1d(D, affine=False, eps=1e-6) (batch statistics in training, running ones at test), then
    Linear(D, C) with weight ~ trunc_normal(std 0.01), bias 0. SGD, momentum 0.9, no weight decay,
    lr = ``base_lr`` x ``batch`` / 256; the first ``warmup_epochs`` a linear warm-up, then a per-step half
    cosine to 0. Both MAE probes (`mae_linear_probe` on features, `histodistill.eval.image_probe` on
    augmented images) train through this one loop.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
        nn.init.trunc_normal_(head[1].weight, std=0.01)  # MoCo v3 / MAE: the head starts near zero
        nn.init.zeros_(head[1].bias)
    head.to(device).train()
    config = OptimConfig(
        name="sgd",
        lr=base_lr,
        reference_batch_size=256,
        momentum=0.9,
        weight_decay=0.0,
        warmup_epochs=warmup_epochs,
        min_lr=0.0,
    )
    lr = scaled_lr(config, batch)
    optimizer = build_optimizer(head, config, lr)
    scheduler = build_scheduler(optimizer, config, lr, epochs * steps_per_epoch, steps_per_epoch)
    for features, labels in batches:
        loss = nn.functional.cross_entropy(head(features.to(device)), labels.to(device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    return head.eval()


def score_head(
    head: nn.Module, test_x: np.ndarray | torch.Tensor, test_y: np.ndarray, num_classes: int
) -> ProbeResult:
    """Metrics of a trained head on test features (M, D)."""
    device = next(head.parameters()).device
    with torch.no_grad():
        probs = head(torch.as_tensor(test_x, dtype=torch.float32).to(device)).softmax(dim=1).cpu().numpy()
    return ProbeResult(classification_metrics(test_y, probs, num_classes), probs)


def mae_linear_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    seed: int = 0,
    num_classes: int | None = None,
    epochs: int = EPOCHS,
    warmup_epochs: int = WARMUP_EPOCHS,
    batch_size: int = BATCH_SIZE,
    base_lr: float = BASE_LR,
) -> ProbeResult:
    """MAE's linear probe (`train_mae_head`) on frozen features ``train_x`` (N, D), scored on ``test_x`` (M,
    D).

    Shuffled batches of B = 512, the last incomplete one dropped (`mae_batch_orders`); a training set
    smaller than ``batch_size`` is one batch per step (the lr still follows its size / 256). Precomputed
    features get no per-image augmentation; `histodistill.eval.image_probe.mae_image_probe` applies the
    official RandomResizedCrop + flip (docs/sdmae.md).
    """
    num_classes = num_classes or int(max(train_y.max(), test_y.max())) + 1
    x = torch.as_tensor(train_x, dtype=torch.float32)
    y = torch.as_tensor(train_y, dtype=torch.long)
    orders = mae_batch_orders(len(x), batch_size, epochs, seed)
    batches = ((x[index], y[index]) for order in orders for index in order)  # index: (batch,) sample indices
    head = train_mae_head(
        batches,
        x.shape[1],
        num_classes,
        orders[0].shape[1],
        len(orders[0]),
        seed,
        epochs,
        warmup_epochs,
        base_lr,
    )
    return score_head(head, test_x, test_y, num_classes)


PROBES = {"linear": linear_probe, "knn": knn_probe}
LINEAR_PROTOCOLS = {"sklearn": linear_probe, "mae": mae_linear_probe}


def load_patch_features(
    path: str | os.PathLike, labels_csv: str | os.PathLike | None = None
) -> PatchFeatures:
    """Read a ``features.h5`` of `histodistill extract --images` (or a folder holding one), or a folder of
    per-slide features (ours, CLAM's, TRIDENT's; see `load_slide_embeddings`).

    ``labels_csv`` (columns ``path,label``, paths as stored in the file) replaces the labels and keeps
    only the listed patches.
    """
    path = Path(path)
    if path.is_dir() and not (path / PATCH_FEATURES).is_file():
        return load_slide_embeddings(path, labels_csv)
    if path.is_dir():
        path = path / PATCH_FEATURES
    if not path.is_file():
        raise UserError(f"{path} does not exist; make it with `histodistill extract --images DIR --out OUT`")
    try:
        with h5py.File(path) as handle:
            missing = {FEATURES, "labels"} - set(handle)
            if missing:
                raise UserError(
                    f"{path} has no {sorted(missing)} datasets: not a patch features file from `extract "
                    "--images`"
                )
            features = handle[FEATURES][:].astype(np.float32)
            labels = handle["labels"][:].astype(np.int64)
            paths = handle["paths"].asstr()[:] if "paths" in handle else np.arange(len(labels)).astype(str)
            classes = [str(c) for c in handle.attrs.get("classes", [str(i) for i in range(labels.max() + 1)])]
    except (OSError, KeyError, ValueError) as error:
        raise UserError(
            f"{path} cannot be read ({type(error).__name__}: {error}): it is truncated or not a features "
            "file; extract it again with `histodistill extract --images ... --overwrite`"
        ) from None
    if bad := non_finite_rows(features):
        raise UserError(f"{path} has {bad} non-finite rows (NaN or inf) of {len(features)}: extract it again")
    if labels_csv is None:
        return PatchFeatures(features, labels, np.asarray(paths), classes)
    table = read_table(labels_csv, "labels CSV", ("path", "label"))
    rows = table.rows
    if not rows:
        raise UserError(
            f"`labels_csv={labels_csv}`: expected a CSV with columns path,label and at least one row"
        )
    row_labels = clean_labels([row["label"] for row in rows], table.lines, f"`labels_csv={labels_csv}`")
    position = {p: i for i, p in enumerate(paths)}
    unknown = [row["path"] for row in rows if row["path"] not in position]
    if unknown:
        raise UserError(
            f"`labels_csv={labels_csv}`: {len(unknown)} paths are not in {path}, e.g. {unknown[:3]}"
        )
    classes = class_order(row_labels)
    keep = np.array([position[row["path"]] for row in rows])
    new_labels = np.array([classes.index(label) for label in row_labels], dtype=np.int64)
    return PatchFeatures(features[keep], new_labels, np.asarray(paths)[keep], classes)


def load_slide_embeddings(folder: str | os.PathLike, labels_csv: str | os.PathLike | None) -> PatchFeatures:
    """Slide-level probe data: the mean of each slide's tile features (D,), labelled by a CLAM labels CSV
    (``case_id,slide_id,label``); a case's slides share its cross-validation part (``groups``)."""
    try:
        feature_folder = open_feature_folder(folder)
    except UserError:
        raise UserError(
            f"{folder} holds neither a {PATCH_FEATURES} (`histodistill extract --images`) nor per-slide "
            "features files (`extract --coords`, CLAM, TRIDENT): pass one of those"
        ) from None
    if labels_csv is None:
        raise UserError(
            f"{folder} is a folder of per-slide features: pass as `labels_csv=...` a "
            "case_id,slide_id,label CSV to probe mean-pooled slide embeddings"
        )
    rows = read_labels(labels_csv)
    slides = load_slides(feature_folder, [r.slide_id for r in rows])
    if empty := [r.slide_id for r in rows if not slides[r.slide_id].n_tiles]:
        raise UserError(
            f"{len(empty)} slide(s) in {feature_folder.describe()} have no tissue tiles (features (0, D)): "
            f"{shown(empty)}; remove them from the labels CSV"
        )
    classes = class_names(rows)
    features = np.stack([slides[r.slide_id].features.mean(axis=0) for r in rows]).astype(np.float32)  # (S, D)
    labels = np.array([classes.index(r.label) for r in rows], dtype=np.int64)
    groups = np.array([r.case_id or r.slide_id for r in rows])
    return PatchFeatures(features, labels, np.array([r.slide_id for r in rows]), classes, groups)


def evaluate_probes(
    data: PatchFeatures,
    out_dir: str | os.PathLike,
    test: PatchFeatures | None = None,
    seeds: tuple[int, ...] = (0, 1, 2),
    folds: int = 5,
    C: float | None = None,
    k: int = 20,
    temperature: float = 0.07,
    linear_protocol: str = "sklearn",
    mae_options: dict | None = None,
    linear: Callable[..., ProbeResult] | None = None,
    record: dict | None = None,
) -> dict:
    """Run both probes and write ``probe.json`` and ``confusion_<probe>.png`` into ``out_dir``.

    ``mae_options`` (``epochs``, ``batch_size``, ...) go to the ``mae`` linear protocol. ``linear`` replaces
    the protocol's linear probe (the augmented-image probe of `histodistill.eval.image_probe`), and
    ``record`` adds entries to ``probe.json`` (what the features came from).

    Without ``test``: stratified ``folds``-fold cross-validation of ``data``, reshuffled per seed.
    With ``test``: train on ``data``, test on ``test`` once per seed. Each metric is reported per run and
    as mean and sample sd over runs; the confusion matrix shows seed ``seeds[0]``'s predictions
    (out-of-fold predictions of every sample under cross-validation).
    """
    from histodistill.eval.metrics import plot_confusion
    from histodistill.io import write_json

    if test is not None and test.classes != data.classes:
        raise UserError(f"the training classes {data.classes} differ from the test classes {test.classes}")
    num_classes = len(data.classes)
    if linear_protocol not in LINEAR_PROTOCOLS:
        raise ConfigError(f"`linear_protocol={linear_protocol!r}`: use one of {', '.join(LINEAR_PROTOCOLS)}")
    probes = {**PROBES, "linear": linear or LINEAR_PROTOCOLS[linear_protocol]}
    linear_options = {"C": C} if linear_protocol == "sklearn" else dict(mae_options or {})
    options = {"linear": linear_options, "knn": {"k": k, "temperature": temperature}}
    results: dict = {
        "protocol": "train/test" if test is not None else f"{folds}-fold CV",
        "seeds": list(seeds),
        "classes": data.classes,
        "options": options,
        "linear_protocol": linear_protocol,
        **(record or {}),
    }
    for name, probe in probes.items():
        runs, first_truth, first_pred = [], [], []
        for seed in seeds:
            for split, (train_x, train_y, test_x, test_y) in enumerate(_splits(data, test, folds, seed)):
                result = probe(
                    train_x, train_y, test_x, test_y, seed, num_classes=num_classes, **options[name]
                )
                runs.append({"seed": seed, "split": split, **result.metrics})
                if seed == seeds[0]:
                    first_truth.append(test_y)
                    first_pred.append(result.predictions)
        metric_names = list(runs[0].keys() - {"seed", "split"})
        results[name] = {
            "mean": {m: float(np.nanmean([r[m] for r in runs])) for m in sorted(metric_names)},
            "std": {
                m: float(np.nanstd([r[m] for r in runs], ddof=1)) if len(runs) > 1 else 0.0
                for m in sorted(metric_names)
            },
            "runs": runs,
        }
        plot_confusion(
            np.concatenate(first_truth),
            np.concatenate(first_pred),
            data.classes,
            Path(out_dir) / f"confusion_{name}.png",
            title=f"{name} probe, seed {seeds[0]}",
        )
    write_json(Path(out_dir) / "probe.json", results)
    return results


def _splits(data: PatchFeatures, test: PatchFeatures | None, folds: int, seed: int):
    if test is not None:
        yield data.features, data.labels, test.features, test.labels
        return
    counts = np.bincount(data.labels, minlength=len(data.classes))
    if folds < 2 or counts.min() < folds:
        per_class = ", ".join(f"{name!r} {n}" for name, n in zip(data.classes, counts, strict=True))
        raise ConfigError(
            f"`folds={folds}`: every class needs at least {max(folds, 2)} samples, one per test "
            f"fold; samples per class are {per_class}. "
            + (f"Either lower `folds=...` to {counts.min()}, add" if counts.min() >= 2 else "Add")
            + " samples of the small classes, or pass a test set (`test=...`)"
        )
    if data.groups is None:
        parts = StratifiedKFold(folds, shuffle=True, random_state=seed).split(data.features, data.labels)
    else:
        splitter = StratifiedGroupKFold(folds, shuffle=True, random_state=seed)
        parts = splitter.split(data.features, data.labels, data.groups)
    for train, held in parts:
        yield data.features[train], data.labels[train], data.features[held], data.labels[held]
