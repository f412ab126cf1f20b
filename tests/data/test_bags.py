"""Bags from features files and a labels CSV; the padding collate."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from histodistill.data.bags import BagDataset, class_names, collate_bags, make_bags, read_labels
from histodistill.errors import UserError


def write_features(directory, slide_id, n, dim=4, offset=0.0):
    directory.mkdir(parents=True, exist_ok=True)
    with h5py.File(directory / f"{slide_id}.h5", "w") as handle:
        handle["features"] = np.full((n, dim), offset, np.float32) + np.arange(n, dtype=np.float32)[:, None]
        handle["coords"] = np.stack([np.arange(n) * 256, np.zeros(n)], 1).astype(np.int64)


@pytest.fixture
def labelled(tmp_path):
    csv = tmp_path / "labels.csv"
    csv.write_text("case_id,slide_id,label,site\nA,a1,tumor,x\nA,a2,tumor,x\nB,b1,normal,y\n")
    for slide_id, n in (("a1", 3), ("a2", 2), ("b1", 5)):
        write_features(tmp_path / "feats", slide_id, n)
    return csv, tmp_path / "feats"


def test_slide_bags_and_case_bags(labelled):
    csv, feats = labelled
    rows = read_labels(csv)
    classes = class_names(rows)
    assert classes == ["normal", "tumor"]
    per_slide = BagDataset(feats, make_bags(rows, classes))
    assert [item["bag_id"] for item in per_slide] == ["a1", "a2", "b1"]
    per_case = BagDataset(feats, make_bags(rows, classes, by_case=True))
    assert len(per_case) == 2
    case_a = per_case[0]
    assert case_a["bag_id"] == "A" and case_a["label"] == 1
    assert case_a["features"].shape == (5, 4)
    assert case_a["slide_index"].tolist() == [0, 0, 0, 1, 1]


def test_collate_pads_with_mask(labelled):
    csv, feats = labelled
    rows = read_labels(csv)
    data = BagDataset(feats, make_bags(rows, class_names(rows)))
    batch = collate_bags([data[0], data[2]])
    assert batch["features"].shape == (2, 5, 4)
    assert batch["mask"].tolist() == [[True] * 3 + [False] * 2, [True] * 5]
    assert (batch["features"][0, 3:] == 0).all()
    torch.testing.assert_close(batch["features"][1], data[2]["features"])
    assert batch["labels"].tolist() == [1, 0]


def test_numeric_labels_sort_numerically():
    from histodistill.data.bags import SlideLabel

    rows = [SlideLabel("c", f"s{i}", label) for i, label in enumerate(["10", "2", "1"])]
    assert class_names(rows) == ["1", "2", "10"]


def test_bad_inputs_name_the_file_and_fix(tmp_path, labelled):
    csv, feats = labelled
    bad = tmp_path / "bad.csv"
    bad.write_text("slide,label\na1,1\n")
    with pytest.raises(UserError, match="bad.csv.*case_id"):
        read_labels(bad)
    mixed = tmp_path / "mixed.csv"
    mixed.write_text("case_id,slide_id,label\nA,a1,tumor\nA,a2,normal\n")
    rows = read_labels(mixed)
    with pytest.raises(UserError, match="case 'A'"):
        make_bags(rows, class_names(rows), by_case=True)
    missing = tmp_path / "missing.csv"
    missing.write_text("case_id,slide_id,label\nZ,zz,tumor\n")
    rows = read_labels(missing)
    with pytest.raises(UserError, match="zz.*histodistill extract"):
        BagDataset(feats, make_bags(rows, class_names(rows)))
