"""MAE's / SD-MAE's linear probe on images, with the official per-image training augmentation.

``main_linprobe.py`` (MAE) and ``run_mae_eval_linear.py`` (SD-MAE) train the probe head on a frozen
encoder fed freshly augmented images every epoch: RandomResizedCrop(S, bicubic, scale (0.08, 1)) +
RandomHorizontalFlip + ImageNet normalisation (our ``linprobe`` recipe, normalised with the backbone's
mean/std), and test on resized, centre-cropped images. Here the frozen backbone runs in eval mode under
``torch.no_grad`` on each training batch (its BatchNorm statistics and weights never change), its pooled
output is the feature (SD-MAE checkpoints: the mean of the normed tokens; timm ViTs: their ``global_pool``,
the class token as MAE's ``--cls_token``; CNNs: global average pooling), and the head, optimiser and
schedule are `histodistill.eval.probe.train_mae_head`'s, shared with the probe on precomputed features.

Augmentation draws are seeded per (seed, epoch, image) (`SeededAugmentation`), so a seed gives the same
metrics with any number of DataLoader workers.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from histodistill.data.datamodule import SeededAugmentation
from histodistill.data.datasets import ImageFolderDataset
from histodistill.data.feature_files import require_finite
from histodistill.data.transforms import build_transform
from histodistill.errors import UserError
from histodistill.eval.probe import (
    BASE_LR,
    BATCH_SIZE,
    EPOCHS,
    WARMUP_EPOCHS,
    PatchFeatures,
    ProbeResult,
    mae_batch_orders,
    score_head,
    train_mae_head,
)
from histodistill.features.extract import extract_features, prepare_model
from histodistill.models.backbones import Backbone


@dataclass
class ImageProbeData:
    """A frozen backbone on ``device`` and its train/test image folders (eval transform: the features the
    kNN probe and the test split use; the training images are re-augmented per epoch by `mae_image_probe`)."""

    backbone: Backbone
    train: ImageFolderDataset
    test: ImageFolderDataset
    device: torch.device
    num_workers: int = 0


def open_image_folders(
    train_dir: str | os.PathLike, test_dir: str | os.PathLike
) -> tuple[ImageFolderDataset, ImageFolderDataset]:
    """Both folders listed and checked (class subfolders with images, the same classes) before any work;
    `UserError` naming the folder otherwise."""
    train, test = ImageFolderDataset(train_dir), ImageFolderDataset(test_dir)
    if train.classes != test.classes:
        raise UserError(
            f"`test_dir={test_dir}` has classes {test.classes} but `train_dir={train_dir}` has "
            f"{train.classes}: both folders need the same class subfolders"
        )
    return train, test


def eval_features(data: ImageProbeData, batch_size: int = BATCH_SIZE) -> tuple[PatchFeatures, PatchFeatures]:
    """Features (N, D) of the train and test images under the backbone's eval transform (resize + centre
    crop), ``batch_size`` images per forward pass."""
    transform = build_transform("eval", data.backbone.spec.preprocess, train=False)
    prepare_model(data.backbone, data.device)
    out = []
    for folder, name in ((data.train, "train"), (data.test, "test")):
        dataset = copy.copy(folder)  # the same files, another transform
        dataset.transform = transform
        features, labels = extract_features(
            data.backbone, dataset, batch_size, data.num_workers, data.device, desc=f"{name} images"
        )
        require_finite(features, f"image folder {dataset.root}", data.backbone.spec.name)
        paths = np.array([str(path.relative_to(dataset.root)) for path, _ in dataset.samples])
        out.append(PatchFeatures(features, labels.astype(np.int64), paths, list(dataset.classes)))
    return out[0], out[1]


def mae_image_probe(
    data: ImageProbeData,
    test_x: np.ndarray,
    test_y: np.ndarray,
    seed: int = 0,
    num_classes: int | None = None,
    epochs: int = EPOCHS,
    warmup_epochs: int = WARMUP_EPOCHS,
    batch_size: int = BATCH_SIZE,
    base_lr: float = BASE_LR,
) -> ProbeResult:
    """The MAE linear probe trained on ``data.train``'s images, augmented afresh every epoch (``linprobe``
    recipe), scored on the test features ``test_x`` (M, D) (eval transform, `eval_features`)."""
    train = copy.copy(data.train)  # the same files, the training transform
    train.transform = build_transform("linprobe", data.backbone.spec.preprocess, train=True)
    num_classes = num_classes or len(train.classes)
    orders = mae_batch_orders(len(train), batch_size, epochs, seed)
    # SeededAugmentation's item epoch * N + i is image i drawn with the generator seeded by (seed, epoch, i).
    keys = [(epoch * len(train) + index).tolist() for epoch, order in enumerate(orders) for index in order]
    loader = DataLoader(
        SeededAugmentation(train, seed),
        batch_sampler=keys,
        num_workers=data.num_workers,
        pin_memory=data.device.type == "cuda",
    )
    steps = tqdm(
        loader,
        desc=f"linear probe, seed {seed}, {epochs} epochs",
        unit="step",
        leave=False,
        dynamic_ncols=True,
    )
    batches = _frozen_features(data.backbone, steps, data.device, f"augmented images of {train.root}")
    head = train_mae_head(
        batches,
        data.backbone.num_features,
        num_classes,
        orders[0].shape[1],
        len(orders[0]),
        seed,
        epochs,
        warmup_epochs,
        base_lr,
        data.device,
    )
    return score_head(head, test_x, test_y, num_classes)


def image_linear_probe(data: ImageProbeData) -> Callable[..., ProbeResult]:
    """`mae_image_probe` in the shape of the feature probes (``train_x, train_y, test_x, test_y, seed,
    num_classes, **options``) for `evaluate_probes`: ``train_x`` (the eval-transform features the kNN probe
    uses) is not read, since the head trains on features of augmented images; ``train_y`` must be the
    training folder's labels in its order (checked)."""

    def probe(train_x, train_y, test_x, test_y, seed=0, num_classes=None, **options) -> ProbeResult:
        if not np.array_equal(train_y, [label for _, label in data.train.samples]):
            raise ValueError("train_y is not the training image folder's labels in its order")
        return mae_image_probe(data, test_x, test_y, seed, num_classes, **options)

    return probe


def _frozen_features(
    backbone: Backbone,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    source: str,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(features (B, D), labels (B,)) per batch, from the backbone in eval mode without gradients; a NaN or
    inf feature stops the run (`UserError` naming ``source``) instead of training the head on it."""
    prepare_model(backbone, device)
    for images, labels in loader:  # images: (B, 3, S, S) normalised
        with torch.no_grad():
            features = backbone(images.to(device, non_blocking=True)).float()  # (B, D)
        if not torch.isfinite(features).all():
            require_finite(features.cpu().numpy(), source, backbone.spec.name)
        yield features, labels
