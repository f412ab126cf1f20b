"""Bags of tile features for slide-level MIL: labels CSV → bags → padded batches.

The labels CSV is CLAM's: columns ``case_id,slide_id,label`` (extra columns are ignored). A bag is
one slide, or (``by_case=True``) every slide of one case together, which is how a diagnosis made
on several slides of a patient is learned. Features come from a folder of per-slide files written by
``histodistill extract``, CLAM or TRIDENT (`histodistill.data.feature_files`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from histodistill.data.feature_files import (
    FeatureFolder,
    SlideFeatures,
    feature_dim,
    load_slides,
    open_feature_folder,
    shown,
)
from histodistill.data.labels import class_order, clean_labels, describe_classes
from histodistill.data.table import read_table
from histodistill.errors import UserError

LABEL_COLUMNS = ("case_id", "slide_id", "label")


@dataclass(frozen=True)
class SlideLabel:
    case_id: str
    slide_id: str
    label: str


@dataclass(frozen=True)
class Bag:
    """What one training example is made of: a slide, or all slides of a case."""

    bag_id: str  # the slide id, or the case id when slides are grouped by case
    case_id: str
    slide_ids: tuple[str, ...]
    label: int  # index into the class list


def read_labels(path: str | os.PathLike) -> list[SlideLabel]:
    """Rows of a ``case_id,slide_id,label`` CSV (`histodistill.data.table.read_table`: BOM, ``;`` or tab,
    spaces, CRLF), labels in one spelling per class (`histodistill.data.labels.clean_labels`: missing ones
    and case-only differences refused, ``1.0`` read as ``1``); a `UserError` names the file when it is
    malformed."""
    table = read_table(path, "labels CSV", LABEL_COLUMNS)
    if not table.rows:
        raise UserError(f"labels CSV {path} has no rows")
    labels = clean_labels([r["label"] for r in table.rows], table.lines, f"labels CSV {path}")
    rows = [
        SlideLabel(r["case_id"], r["slide_id"], label) for r, label in zip(table.rows, labels, strict=True)
    ]
    seen: set[str] = set()
    for row, line in zip(rows, table.lines, strict=True):
        if not row.slide_id:
            raise UserError(f"labels CSV {path}: line {line} has an empty slide_id ({row})")
        if row.slide_id in seen:
            raise UserError(
                f"labels CSV {path}: slide_id {row.slide_id!r} appears twice; list each slide once"
            )
        seen.add(row.slide_id)
    return rows


def class_names(rows: list[SlideLabel]) -> list[str]:
    """Sorted distinct labels (`histodistill.data.labels.class_order`: numerically when all are numbers), so
    label ``1`` / ``positive`` / ``tumor`` comes after ``0`` / ``negative`` / ``normal`` and is the positive
    class."""
    return class_order([row.label for row in rows])


def describe_labels(rows: list[SlideLabel], path: str | os.PathLike) -> str:
    """The line printed before training on ``rows``: each class with its number of slides."""
    return describe_classes([row.label for row in rows], "slides", str(path))


def make_bags(rows: list[SlideLabel], classes: list[str], by_case: bool = False) -> list[Bag]:
    """One bag per slide, or per case with ``by_case`` (its slides must share one label)."""
    index = {name: i for i, name in enumerate(classes)}
    if not by_case:
        return [Bag(r.slide_id, r.case_id or r.slide_id, (r.slide_id,), index[r.label]) for r in rows]
    cases: dict[str, list[SlideLabel]] = {}
    for row in rows:
        cases.setdefault(row.case_id or row.slide_id, []).append(row)
    bags = []
    for case_id, members in cases.items():
        labels = {m.label for m in members}
        if len(labels) > 1:
            raise UserError(
                f"case {case_id!r} has slides with different labels {sorted(labels)}: fix the labels CSV "
                "or train one bag per slide (without `by_case=True`)"
            )
        bags.append(Bag(case_id, case_id, tuple(m.slide_id for m in members), index[members[0].label]))
    return bags


def empty_bags(bags: list[Bag], slides: Mapping[str, SlideFeatures]) -> list[Bag]:
    """Bags without a single tile: every slide in them is (0, D), i.e. tiling found no tissue."""
    return [bag for bag in bags if not any(slides[s].n_tiles for s in bag.slide_ids)]


def empty_bags_error(empty: list[Bag], folder: str) -> UserError:
    """The message for empty bags: all of them by name, why, and the two ways on."""
    slides = [s for bag in empty for s in bag.slide_ids]
    return UserError(
        f"{len(slides)} slide(s) in {folder} have no tissue tiles (features of shape (0, D)): "
        f"{shown(slides)}. Tiling found no tissue on them, so re-tiling with the same settings gives 0 tiles "
        "again: pass `drop_empty=True` "
        "to leave them out (the run's metrics.json lists them) or remove them from the labels CSV"
    )


class BagDataset(Dataset):
    """Bags read from a features folder (any layout `open_feature_folder` knows), held in memory
    (feature bags are small: N×D floats).

    An item is a dict: ``features`` (N, D) float32, ``coords`` (N, 2) long, ``slide_index`` (N,) long
    (which of the bag's slides each instance comes from), ``label`` (int), ``bag_id`` (str).
    Files without coords (CLAM's pt_files) give coords -1; ``has_coords`` says which slides have them.
    ``slides`` passes features already read by `load_slides` (then ``features_dir`` only names them).
    Raises `UserError` before returning for anything `load_slides` refuses and for empty bags.
    """

    def __init__(
        self,
        features_dir: str | os.PathLike | FeatureFolder,
        bags: list[Bag],
        slides: Mapping[str, SlideFeatures] | None = None,
    ) -> None:
        folder = features_dir if isinstance(features_dir, FeatureFolder) else None
        if slides is None:
            folder = folder or open_feature_folder(features_dir)
            slides = load_slides(folder, [s for bag in bags for s in bag.slide_ids])
        if empty := empty_bags(bags, slides):
            raise empty_bags_error(empty, str(folder.describe() if folder else features_dir))
        self.bags = bags
        self.dim = feature_dim(slides)
        self.attrs = {s: slides[s].attrs for bag in bags for s in bag.slide_ids}
        self.has_coords = {s: slides[s].coords is not None for bag in bags for s in bag.slide_ids}
        self.items = [self._item(bag, slides) for bag in bags]

    @staticmethod
    def _item(bag: Bag, slides: Mapping[str, SlideFeatures]) -> dict:
        parts = [slides[s] for s in bag.slide_ids]
        coords = [p.coords if p.coords is not None else np.full((p.n_tiles, 2), -1, np.int64) for p in parts]
        return {
            "features": torch.from_numpy(np.concatenate([p.features for p in parts])),
            "coords": torch.from_numpy(np.concatenate(coords)),
            "slide_index": torch.cat(
                [torch.full((p.n_tiles,), i, dtype=torch.long) for i, p in enumerate(parts)]
            ),
            "label": bag.label,
            "bag_id": bag.bag_id,
        }

    @property
    def feature_dim(self) -> int:
        return self.dim

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


def collate_bags(items: list[dict]) -> dict:
    """Pad bags to the longest one: ``features`` (B, N, D), ``mask`` (B, N) bool (True = real),
    ``coords`` (B, N, 2), ``slide_index`` (B, N), ``labels`` (B,), ``bag_ids`` list[str]."""
    longest = max(item["features"].shape[0] for item in items)

    def pad(tensor: torch.Tensor) -> torch.Tensor:
        extra = longest - tensor.shape[0]
        return torch.cat([tensor, tensor.new_zeros((extra, *tensor.shape[1:]))]) if extra else tensor

    mask = torch.zeros(len(items), longest, dtype=torch.bool)
    for b, item in enumerate(items):
        mask[b, : item["features"].shape[0]] = True
    return {
        "features": torch.stack([pad(item["features"]) for item in items]),
        "mask": mask,
        "coords": torch.stack([pad(item["coords"]) for item in items]),
        "slide_index": torch.stack([pad(item["slide_index"]) for item in items]),
        "labels": torch.tensor([item["label"] for item in items], dtype=torch.long),
        "bag_ids": [item["bag_id"] for item in items],
    }
