"""Case-level splits: no case in two parts, stratified, seeded, CLAM CSV round trip."""

from __future__ import annotations

import math

import pytest

from histodistill.data.bags import SlideLabel
from histodistill.data.splits import (
    PARTS,
    check_split,
    make_splits,
    min_cases_per_class,
    read_split,
    read_splits_dir,
    write_split,
)
from histodistill.errors import UserError


def labels(n_cases: int = 20) -> list[SlideLabel]:
    """Cases with one to three slides each, half of them positive."""
    rows = []
    for c in range(n_cases):
        for s in range(1 + c % 3):
            rows.append(SlideLabel(f"case{c}", f"case{c}_s{s}", "tumor" if c % 2 else "normal"))
    return rows


def test_no_case_in_two_parts_and_every_slide_tested_once():
    rows = labels()
    case_of = {r.slide_id: r.case_id for r in rows}
    splits = make_splits(rows, folds=4, val_fraction=0.25, seed=3)
    assert len(splits) == 4
    for split in splits:
        parts_of_case: dict[str, set[str]] = {}
        for part in PARTS:
            for slide in split[part]:
                parts_of_case.setdefault(case_of[slide], set()).add(part)
        assert all(len(parts) == 1 for parts in parts_of_case.values())
        assert sorted(sum((split[p] for p in PARTS), [])) == sorted(case_of)
        assert split["val"], "each fold holds out a validation part"
    tested = sorted(s for split in splits for s in split["test"])
    assert tested == sorted(case_of)


def test_val_fraction_zero_trains_on_every_remaining_case_with_the_same_test_folds():
    rows = labels()
    held, none = (
        make_splits(rows, folds=4, val_fraction=0.25, seed=3),
        make_splits(rows, folds=4, val_fraction=0, seed=3),
    )
    for a, b in zip(held, none, strict=True):
        assert b["val"] == [] and b["test"] == a["test"] and b["train"] == sorted(a["train"] + a["val"])
    with pytest.raises(UserError, match=r"\[0, 1\)"):
        make_splits(rows, folds=4, val_fraction=1.0)


def test_test_folds_are_stratified():
    rows = labels(24)
    label_of = {r.slide_id: r.label for r in rows}
    for split in make_splits(rows, folds=3, seed=0):
        test_labels = {label_of[s] for s in split["test"]}
        assert test_labels == {"tumor", "normal"}


def test_same_seed_same_splits_other_seed_differs():
    rows = labels()
    assert make_splits(rows, 5, seed=7) == make_splits(rows, 5, seed=7)
    assert make_splits(rows, 5, seed=7) != make_splits(rows, 5, seed=8)


def test_clam_csv_round_trip_and_directory(tmp_path):
    rows = labels(12)
    splits = make_splits(rows, 3, seed=0)
    for k, split in enumerate(splits):
        write_split(tmp_path / f"splits_{k}.csv", split)
    (tmp_path / "splits_0_bool.csv").write_text("ignored\n")
    header = (tmp_path / "splits_0.csv").read_text().splitlines()[0]
    assert header == ",train,val,test"
    assert read_split(tmp_path / "splits_1.csv") == splits[1]
    assert read_splits_dir(tmp_path, rows) == splits


def test_user_split_with_a_case_in_two_parts_is_refused():
    rows = labels(6)
    split = {"train": ["case2_s0", "case1_s0"], "val": [], "test": ["case2_s1"]}
    with pytest.raises(UserError, match="case2"):
        check_split(split, rows, "splits_0.csv")


def test_too_many_folds_is_a_user_error_naming_the_folds_and_splits_parameters():
    with pytest.raises(UserError, match="`folds=5`") as info:
        make_splits(labels(3), folds=5)
    assert "`splits_dir=...`" in str(info.value) and "lower `folds=...`" in str(info.value)


def test_without_a_validation_part_a_class_needs_one_training_case_per_fold_fewer():
    # 2 folds: one case per test fold and one left to train on; with validation, two left.
    assert min_cases_per_class(2, validation=False) == 2 and min_cases_per_class(2) == 4
    rows = [SlideLabel(f"c{i}", f"s{i}", label) for i, label in enumerate("aabb")]
    assert len(make_splits(rows, folds=2, val_fraction=0)) == 2
    with pytest.raises(UserError, match="two left to train and validate on"):
        make_splits(rows, folds=2, val_fraction=0.25)


@pytest.mark.parametrize(("folds", "needed"), [(2, 4), (3, 3), (5, 5), (10, 10)])
def test_minimum_cases_per_class(folds, needed):
    # Every test fold holds one case of the class and two are left for training and validation.
    assert min_cases_per_class(folds) == needed
    assert needed - math.ceil(needed / folds) >= 2 and needed >= folds


def test_two_folds_with_too_few_cases_names_each_class_count_and_the_minimum():
    rows = [SlideLabel(f"c{i}", f"s{i}", label) for i, label in enumerate(["a", "a", "a", "a", "b", "b"])]
    with pytest.raises(UserError) as info:
        make_splits(rows, folds=2)
    message = str(info.value)
    assert "'a' 4, 'b' 2" in message and "at least 4" in message
    assert "lower `folds" not in message
    assert len(make_splits(rows + [SlideLabel("c6", "s6", "b"), SlideLabel("c7", "s7", "b")], folds=2)) == 2
