"""Bags of tile features for slide-level MIL: labels CSV → bags → padded batches.

The labels CSV is CLAM's: columns ``case_id,slide_id,label`` (extra columns are ignored). A bag is
one slide, or (``by_case=True``) every slide of one case together, which is how a diagnosis made
on several slides of a patient is learned. Features come from ``<features_dir>/<slide_id>.h5``
(datasets ``features`` (N, D) float32 and ``coords`` (N, 2) int64, written by ``histodistill extract``).
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

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
    """Rows of a ``case_id,slide_id,label`` CSV; a `UserError` names the file when it is malformed."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"labels CSV {path} does not exist: pass --labels with a case_id,slide_id,label CSV")
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in LABEL_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise UserError(f"labels CSV {path} lacks column(s) {missing}: its header must include case_id,slide_id,label")
        rows = [SlideLabel(r["case_id"].strip(), r["slide_id"].strip(), r["label"].strip()) for r in reader]
    if not rows:
        raise UserError(f"labels CSV {path} has no rows")
    seen: set[str] = set()
    for row in rows:
        if not row.slide_id or not row.label:
            raise UserError(f"labels CSV {path}: a row has an empty slide_id or label ({row})")
        if row.slide_id in seen:
            raise UserError(f"labels CSV {path}: slide_id {row.slide_id!r} appears twice; list each slide once")
        seen.add(row.slide_id)
    return rows


def class_names(rows: list[SlideLabel]) -> list[str]:
    """Sorted distinct labels (numerically when all are integers), so label ``1`` / ``positive``
    / ``tumor`` comes after ``0`` / ``negative`` / ``normal`` and is the positive class."""
    labels = {row.label for row in rows}
    if all(label.lstrip("-").isdigit() for label in labels):
        return sorted(labels, key=int)
    return sorted(labels)


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
                "or train one bag per slide (drop --by-case)"
            )
        bags.append(Bag(case_id, case_id, tuple(m.slide_id for m in members), index[members[0].label]))
    return bags


def features_path(features_dir: str | os.PathLike, slide_id: str) -> Path:
    return Path(features_dir) / f"{slide_id}.h5"


def read_features(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """``features`` (N, D) float32 and ``coords`` (N, 2) int64 of one slide's features file."""
    with h5py.File(path, "r") as handle:
        return handle["features"][:].astype(np.float32), handle["coords"][:].astype(np.int64)


def check_features_exist(features_dir: str | os.PathLike, bags: list[Bag]) -> None:
    missing = [s for bag in bags for s in bag.slide_ids if not features_path(features_dir, s).is_file()]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise UserError(
            f"no features file in {features_dir} for slide(s) {shown}: run `histodistill extract` for them "
            "or remove them from the labels CSV"
        )


class BagDataset(Dataset):
    """Bags read from a features directory, held in memory (feature bags are small: N×D floats).

    An item is a dict: ``features`` (N, D) float32, ``coords`` (N, 2) long, ``slide_index`` (N,) long
    (which of the bag's slides each instance comes from), ``label`` (int), ``bag_id`` (str).
    """

    def __init__(self, features_dir: str | os.PathLike, bags: list[Bag]) -> None:
        check_features_exist(features_dir, bags)
        self.bags = bags
        self.items = [self._load(features_dir, bag) for bag in bags]

    @staticmethod
    def _load(features_dir, bag: Bag) -> dict:
        parts = [read_features(features_path(features_dir, s)) for s in bag.slide_ids]
        if any(len(f) == 0 for f, _ in parts):
            raise UserError(f"a features file of bag {bag.bag_id!r} in {features_dir} has no tiles: re-tile that slide")
        return {
            "features": torch.from_numpy(np.concatenate([f for f, _ in parts])),
            "coords": torch.from_numpy(np.concatenate([c for _, c in parts])),
            "slide_index": torch.cat([torch.full((len(f),), i, dtype=torch.long) for i, (f, _) in enumerate(parts)]),
            "label": bag.label,
            "bag_id": bag.bag_id,
        }

    @property
    def feature_dim(self) -> int:
        return int(self.items[0]["features"].shape[1])

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
