"""Cross-validation splits by case, in CLAM's layout: ``splits_<k>.csv`` with columns train,val,test.

All slides of a case always land in the same part, so no patient is both trained on and tested on.
Test folds are stratified by label over cases (`StratifiedGroupKFold`); a validation part (for
early stopping) is then held out of each fold's training cases the same way. Everything is seeded.
"""

from __future__ import annotations

import csv
import math
import os
import re
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from histodistill.data.bags import SlideLabel
from histodistill.data.table import read_table
from histodistill.errors import ConfigError, UserError
from histodistill.io import atomic_path

SPLIT_NAME = re.compile(r"splits_(\d+)\.csv")
PARTS = ("train", "val", "test")
Split = dict[str, list[str]]  # part name -> slide ids


def _stratified_group_folds(labels: np.ndarray, groups: np.ndarray, n_splits: int, seed: int):
    return StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed).split(
        labels, labels, groups
    )


def min_cases_per_class(folds: int, validation: bool = True) -> int:
    """Cases each class needs for ``folds`` folds: one in every test fold (``folds``), and at least two
    left in each fold's training part, one to train on and one to validate on (one, to train on, when no
    validation part is held out)."""
    left = 2 if validation else 1
    n = folds
    while n - math.ceil(n / folds) < left:
        n += 1
    return n


def check_cases_per_class(rows: list[SlideLabel], folds: int, validation: bool = True) -> None:
    """A `UserError` giving every class's case count and the minimum, when a class has too few cases.
    It names the parameters `` `folds=...` `` and `` `splits_dir=...` `` (a command shows its flags)."""
    cases: dict[str, set[str]] = {}
    for r in rows:
        cases.setdefault(r.label, set()).add(r.case_id or r.slide_id)
    needed = min_cases_per_class(folds, validation)
    if min(len(c) for c in cases.values()) < needed:
        counts = ", ".join(f"{label!r} {len(c)}" for label, c in sorted(cases.items()))
        left = "two left to train and validate on" if validation else "one left to train on"
        lower = "lower `folds=...`, " if folds > 2 else ""
        raise UserError(
            f"too few cases per class for `folds={folds}`: cases per class are {counts}; each class needs at "
            f"least {needed} (one in each of the {folds} test folds and {left}). "
            f"Add cases of the small classes, {lower}or pass your own splits (`splits_dir=...`)"
        )


def make_splits(rows: list[SlideLabel], folds: int, val_fraction: float = 0.2, seed: int = 0) -> list[Split]:
    """``folds`` splits; in each, one fold of cases is the test part and ``val_fraction`` of the
    remaining cases (at least one per class where possible) is the validation part; with
    ``val_fraction`` 0 there is none and every remaining case trains (fixed epochs, no early stopping).
    The test folds depend on the labels, cases and seed only, not on ``val_fraction``."""
    if folds < 2:
        raise ConfigError(f"`folds={folds}`: at least 2 folds are needed")
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"`val_fraction={val_fraction}` must be in [0, 1)")
    slide_ids = np.array([r.slide_id for r in rows])
    labels = np.array([r.label for r in rows])
    groups = np.array([r.case_id or r.slide_id for r in rows])
    check_cases_per_class(rows, folds, validation=val_fraction > 0)
    splits = []
    for fold, (rest, test) in enumerate(_stratified_group_folds(labels, groups, folds, seed)):
        if val_fraction == 0:
            splits.append({"train": sorted(slide_ids[rest]), "val": [], "test": sorted(slide_ids[test])})
            continue
        # Hold out one of ~1/val_fraction case folds; with few cases, fewer and larger folds.
        cases_per_label = [len(set(groups[rest][labels[rest] == label])) for label in set(labels[rest])]
        val_splits = min(max(2, round(1 / val_fraction)), max(cases_per_label))
        if val_splits < 2:
            raise UserError(
                f"fold {fold}: too few training cases to hold out a validation part; pass your own splits "
                "(`splits_dir=...`)"
            )
        train, val = next(_stratified_group_folds(labels[rest], groups[rest], val_splits, seed + 1 + fold))
        splits.append(
            {
                "train": sorted(slide_ids[rest][train]),
                "val": sorted(slide_ids[rest][val]),
                "test": sorted(slide_ids[test]),
            }
        )
    return splits


def check_split(split: Split, rows: list[SlideLabel], source: str) -> None:
    """A `UserError` (naming ``source``) if a slide is unknown or in two parts, or a case spans parts."""
    case_of = {r.slide_id: r.case_id or r.slide_id for r in rows}
    part_of_case: dict[str, str] = {}
    seen: set[str] = set()
    for part in PARTS:
        for slide_id in split[part]:
            if slide_id not in case_of:
                raise UserError(f"{source}: slide {slide_id!r} is not in the labels CSV")
            if slide_id in seen:
                raise UserError(f"{source}: slide {slide_id!r} is in more than one part")
            seen.add(slide_id)
            case = case_of[slide_id]
            if part_of_case.setdefault(case, part) != part:
                raise UserError(f"{source}: case {case!r} has slides in both {part_of_case[case]} and {part}")
    if not split["train"] or not split["test"]:
        raise UserError(f"{source}: the train and test columns must not be empty")


def write_split(path: str | os.PathLike, split: Split) -> Path:
    """CLAM's CSV: an unnamed index column, then train,val,test of slide ids (shorter columns end empty)."""
    length = max(len(split[p]) for p in PARTS)
    with atomic_path(path) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["", *PARTS])
        for i in range(length):
            writer.writerow([i, *(split[p][i] if i < len(split[p]) else "" for p in PARTS)])
    return Path(path)


def read_split(path: str | os.PathLike) -> Split:
    """Read a ``splits_<k>.csv`` (CLAM's, or any CSV with train,val,test columns)."""
    table = read_table(path, "splits file", PARTS)
    return {p: [r[p] for r in table.rows if r[p]] for p in PARTS}


def read_splits_dir(directory: str | os.PathLike, rows: list[SlideLabel]) -> list[Split]:
    """Every ``splits_<k>.csv`` in ``directory`` in fold order, each checked against the labels."""
    directory = Path(directory)
    # CLAM also writes splits_<k>_bool.csv and splits_<k>_descriptor.csv beside them: skip those.
    numbered = {
        int(m.group(1)): p for p in directory.glob("splits_*.csv") if (m := SPLIT_NAME.fullmatch(p.name))
    }
    paths = [numbered[k] for k in sorted(numbered)]
    if not paths:
        raise UserError(
            f"no splits_<k>.csv files in {directory}: pass as `splits_dir=...` a directory of "
            "CLAM-style splits"
        )
    splits = [read_split(p) for p in paths]
    for path, split in zip(paths, splits, strict=True):
        check_split(split, rows, str(path))
    return splits
