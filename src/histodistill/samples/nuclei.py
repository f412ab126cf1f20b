"""The labeled nuclei task: real H&E crops centred on typed nuclei, with a spatial train/test split.

Built from the ``hgsc_nest`` sample (1500x1500 H&E of high-grade serous carcinoma) and its instance
and type rasters. Each nucleus gives one ``crop_size`` crop centred on its centroid; its label is
the majority non-zero type over its pixels. Crops that reach past the image border are completed by
reflect padding rather than dropped, so border nuclei (real tissue) stay in the task.

The split is spatial, because neighbouring crops overlap and random splitting would leak pixels
from train into test: nuclei whose crop lies entirely left of ``split_x`` train, those whose crop
lies entirely right of it test, and those whose crop straddles it (a guard band of ``crop_size / 2``
on each side) are dropped. ``split_x`` is the centroid-x quantile that leaves ``test_fraction`` of
the nuclei on the right.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from histodistill.errors import ConfigError, UserError
from histodistill.io import atomic_path, write_json

# Type raster value v is class HGSC_CLASSES[v - 1]. Verified against the `class_name` column of
# hgsc_nest.parquet (tests/data/test_nuclei.py cross-checks it when pyarrow is installed); hard-coded
# so that the task needs no parquet reader.
HGSC_CLASSES = ("connective", "inflammatory", "neoplastic")


class NucleiTask(NamedTuple):
    """Crops (N, H, W, 3) uint8 with int64 labels (N,) indexing ``class_names``."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: tuple[str, ...]


@dataclass(frozen=True)
class Nuclei:
    """One row per labeled nucleus, in increasing instance id."""

    ids: np.ndarray  # (N,) instance ids
    centres_xy: np.ndarray  # (N, 2) int64, centroid rounded to a pixel, (x, y)
    types: np.ndarray  # (N,) int64, majority non-zero type value, 1..num_types


def find_nuclei(instance_mask: np.ndarray, type_mask: np.ndarray) -> Nuclei:
    """Centroid and majority type of every instance in ``instance_mask`` (H, W); 0 is background.

    Instances with no non-zero type pixel carry no label and are left out. Ties go to the lower type.
    """
    if instance_mask.shape != type_mask.shape:
        raise ValueError(
            f"instance mask {instance_mask.shape} and type mask {type_mask.shape} differ in shape"
        )
    inst = instance_mask.astype(np.int64).ravel()
    types = type_mask.astype(np.int64).ravel()
    num_ids, num_types = int(inst.max()) + 1, int(types.max()) + 1
    ys, xs = np.divmod(np.arange(inst.size), instance_mask.shape[1])
    area = np.bincount(inst, minlength=num_ids)
    # votes[i, t]: pixels of instance i with type t, from one bincount over the flattened pair index.
    votes = np.bincount(inst * num_types + types, minlength=num_ids * num_types).reshape(num_ids, num_types)
    votes[:, 0] = 0  # type 0 is "no type", never a label
    ids = np.flatnonzero((area > 0) & (votes.sum(1) > 0))
    ids = ids[ids > 0]
    cx = np.bincount(inst, weights=xs, minlength=num_ids)[ids] / area[ids]
    cy = np.bincount(inst, weights=ys, minlength=num_ids)[ids] / area[ids]
    centres = np.stack([np.rint(cx), np.rint(cy)], axis=1).astype(np.int64)  # (N, 2)
    return Nuclei(ids=ids, centres_xy=centres, types=votes[ids].argmax(1).astype(np.int64))


def crop_around(image: np.ndarray, centres_xy: np.ndarray, size: int) -> np.ndarray:
    """Square crops (N, size, size, C) of ``image`` (H, W, C) with top-left ``centre - size // 2``.

    The image is reflect-padded first, so a crop may reach up to ``size`` past any border.
    """
    pad = size
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    crops = np.empty((len(centres_xy), size, size, image.shape[2]), image.dtype)
    for i, (x, y) in enumerate(centres_xy):
        x0, y0 = x - size // 2 + pad, y - size // 2 + pad
        crops[i] = padded[y0 : y0 + size, x0 : x0 + size]
    return crops


def choose_split_x(centres_x: np.ndarray, test_fraction: float) -> int:
    """The column that leaves about ``test_fraction`` of the centroids at or right of it."""
    if not 0 < test_fraction < 1:
        raise ConfigError(f"`test_fraction={test_fraction}`: must be in (0, 1)")
    return int(np.rint(np.quantile(centres_x, 1 - test_fraction)))


def spatial_split(centres_x: np.ndarray, size: int, split_x: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test): crops ending at or before ``split_x`` / starting at or after it.

    A crop spans columns ``[x - size // 2, x - size // 2 + size)``; nuclei whose crop straddles
    ``split_x`` fall in neither list, so no train pixel ever appears in a test crop.
    """
    start = centres_x - size // 2
    return np.flatnonzero(start + size <= split_x), np.flatnonzero(start >= split_x)


def build_nuclei_task(
    image: np.ndarray,
    instance_mask: np.ndarray,
    type_mask: np.ndarray,
    class_names: tuple[str, ...],
    crop_size: int,
    split_x: int,
) -> NucleiTask:
    """Crop every labeled nucleus of ``image`` (H, W, 3) uint8 and split the crops at ``split_x``."""
    nuclei = find_nuclei(instance_mask, type_mask)
    if nuclei.types.max(initial=0) > len(class_names):
        raise ValueError(f"type value {nuclei.types.max()} has no name in {class_names}")
    train, test = spatial_split(nuclei.centres_xy[:, 0], crop_size, split_x)
    labels = nuclei.types - 1  # type value v -> class index v - 1
    return NucleiTask(
        train_images=crop_around(image, nuclei.centres_xy[train], crop_size),
        train_labels=labels[train],
        test_images=crop_around(image, nuclei.centres_xy[test], crop_size),
        test_labels=labels[test],
        class_names=tuple(class_names),
    )


def load_hgsc() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The hgsc_nest image (H, W, 3) uint8 with its instance and type rasters (H, W), fetched if needed."""
    from histodistill.samples.registry import fetch

    image = np.asarray(Image.open(fetch("hgsc_nest")).convert("RGB"))
    with np.load(fetch("hgsc_nest_inst_mask")) as inst, np.load(fetch("hgsc_nest_type_mask")) as types:
        return image, inst["nuc_raster"], types["nuc_raster"]


def _hgsc_task(crop_size: int, test_fraction: float) -> tuple[NucleiTask, int]:
    image, instance_mask, type_mask = load_hgsc()
    split_x = choose_split_x(find_nuclei(instance_mask, type_mask).centres_xy[:, 0], test_fraction)
    return build_nuclei_task(image, instance_mask, type_mask, HGSC_CLASSES, crop_size, split_x), split_x


def load_nuclei_task(crop_size: int = 64, test_fraction: float = 0.3) -> NucleiTask:
    """The hgsc_nest nuclei task as arrays (fetching the samples on first use)."""
    return _hgsc_task(crop_size, test_fraction)[0]


def class_counts(labels: np.ndarray, class_names: tuple[str, ...]) -> dict[str, int]:
    counts = np.bincount(labels, minlength=len(class_names))
    return {name: int(count) for name, count in zip(class_names, counts, strict=True)}


def write_image_folder(
    out_dir: str | os.PathLike,
    crop_size: int = 64,
    test_fraction: float = 0.3,
    fraction: float = 1.0,
    overwrite: bool = False,
) -> Path:
    """Write the task as ``out_dir/{train,test}/<class>/<index>.png`` plus ``out_dir/nuclei_task.json``.

    ``fraction`` < 1 keeps a seeded, stratified share of each split (`subsample`): a smaller task for a
    smoke run, with the same classes and split.

    The JSON (settings, split column, counts per class per split) is written last and marks the
    folders as finished: a later call with the same settings returns at once. Anything else already
    in ``out_dir/train`` or ``out_dir/test`` is replaced only with ``overwrite``, so stale crops of an
    earlier run never mix with new ones. Returns ``out_dir``.
    """
    out_dir = Path(out_dir)
    summary_path = out_dir / "nuclei_task.json"
    settings = {
        "source": "hgsc_nest",
        "crop_size": crop_size,
        "test_fraction": test_fraction,
        "fraction": fraction,
    }
    split_dirs = [out_dir / "train", out_dir / "test"]
    if not overwrite:
        if summary_path.is_file():
            # older folders kept every nucleus
            previous = {"fraction": 1.0} | json.loads(summary_path.read_text())
            previous = {key: previous.get(key) for key in settings}
            if previous == settings:
                return out_dir
            raise UserError(
                f"{summary_path} holds a nuclei task made with {previous}, not {settings}; "
                "pass `overwrite=True` to replace it, or choose another `out_dir=...`"
            )
        if any(path.is_dir() and any(path.iterdir()) for path in split_dirs):
            raise UserError(
                f"{out_dir} already has train/ or test/ folders; pass `overwrite=True` to replace them"
            )
    task, split_x = _hgsc_task(crop_size, test_fraction)
    task = subsample(task, fraction)
    summary_path.unlink(missing_ok=True)  # the folders are about to change: not finished until rewritten
    for path in split_dirs:
        shutil.rmtree(path, ignore_errors=True)
    splits = {"train": (task.train_images, task.train_labels), "test": (task.test_images, task.test_labels)}
    for split, (images, labels) in splits.items():
        for class_name in task.class_names:
            # every class folder exists in both splits, so image-folder readers index classes alike
            (out_dir / split / class_name).mkdir(parents=True, exist_ok=True)
        for index, (crop, label) in enumerate(zip(images, labels, strict=True)):
            with atomic_path(out_dir / split / task.class_names[label] / f"{index:05d}.png") as tmp:
                Image.fromarray(crop).save(tmp)
    counts = {split: class_counts(labels, task.class_names) for split, (_, labels) in splits.items()}
    write_json(
        summary_path,
        {**settings, "split_x": split_x, "class_names": list(task.class_names), "counts": counts},
    )
    return out_dir


def subsample(task: NucleiTask, fraction: float, seed: int = 0) -> NucleiTask:
    """``task`` with a seeded, stratified ``fraction`` of each split (`stratified_subset`); ``task`` itself at
    1."""
    if fraction == 1:
        return task
    train = stratified_subset(task.train_labels, fraction, seed)
    test = stratified_subset(task.test_labels, fraction, seed)
    return task._replace(
        train_images=task.train_images[train],
        train_labels=task.train_labels[train],
        test_images=task.test_images[test],
        test_labels=task.test_labels[test],
    )


def stratified_subset(labels: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """Sorted indices of a seeded, per-class random ``fraction`` of ``labels`` (at least one per class).

    For limited-label runs: every class keeps its share, and the same seed gives the same subset.
    """
    if not 0 < fraction <= 1:
        raise ConfigError(f"`fraction={fraction}`: must be in (0, 1]")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        keep = max(1, int(round(fraction * len(members))))
        chosen.append(rng.choice(members, size=keep, replace=False))
    return np.sort(np.concatenate(chosen))
