"""Label spellings (issue 29): every CSV label reader refuses missing labels naming the lines, reads
numerically equal spellings as one class, refuses labels that differ only in case, and the classes are said
with counts."""

from __future__ import annotations

import numpy as np
import pytest

from histodistill.data.bags import class_names, describe_labels, read_labels
from histodistill.data.datasets import CsvDataset
from histodistill.data.labels import canonical, class_order, describe_classes
from histodistill.errors import UserError


def labels_csv(tmp_path, labels) -> object:
    path = tmp_path / "labels.csv"
    rows = [f"c{i},s{i},{label}" for i, label in enumerate(labels)]
    path.write_text("case_id,slide_id,label\n" + "\n".join(rows) + "\n")
    return path


def test_zero_one_and_their_float_spellings_are_two_classes_not_four(tmp_path):
    # The reported input: binary labels saved as 0/1 on some rows and 0.0/1.0 on others trained a 4-class
    # model.
    path = labels_csv(tmp_path, ["0", "1", "0.0", "1.0", "1", "0"])
    rows = read_labels(path)
    assert class_names(rows) == ["0", "1"]
    assert [row.label for row in rows] == ["0", "1", "0", "1", "1", "0"]
    assert describe_labels(rows, path) == f"{path}: 2 classes: 0 (3 slides), 1 (3 slides)"


def test_labels_that_differ_only_in_case_are_refused_naming_both(tmp_path):
    path = labels_csv(tmp_path, ["tumor", "Tumor", "normal", "tumor"])
    with pytest.raises(UserError) as info:
        read_labels(path)
    assert "differ only in case: 'Tumor' (1 rows) vs 'tumor' (2 rows)" in str(info.value)


@pytest.mark.parametrize("missing", ["NA", "", "nan", "N/A", "null"])
def test_missing_labels_are_refused_naming_their_lines(tmp_path, missing):
    path = labels_csv(tmp_path, ["tumor", missing, "normal", "NA" if missing else ""])
    with pytest.raises(
        UserError, match=r"labels.csv: 2 row\(s\) have no label \(empty or NA\) on line\(s\) 3, 5:"
    ):
        read_labels(path)


def test_canonical_spellings_and_class_order():
    assert [canonical(s) for s in ("1.0", "01", "1e0", "0.50", "-2.0", "tumor", "inf")] == [
        "1",
        "1",
        "1",
        "0.5",
        "-2",
        "tumor",
        "inf",
    ]
    assert class_order(["10", "2", "1", "0.5"]) == ["0.5", "1", "2", "10"]
    assert class_order(["tumor", "normal"]) == ["normal", "tumor"]
    assert (
        describe_classes(["b", "a", "b"], "images", "x.csv") == "x.csv: 2 classes: a (1 images), b (2 images)"
    )


def test_the_csv_manifest_reads_labels_the_same_way(tmp_path):
    from PIL import Image

    for i in range(4):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "m.csv").write_text("path,label\n0.png,0\n1.png,1.0\n2.png,0.0\n3.png,1\n")
    dataset = CsvDataset(tmp_path / "m.csv")
    assert dataset.classes == ["0", "1"] and [label for _, label in dataset.samples] == [0, 1, 0, 1]
    (tmp_path / "m.csv").write_text("path,label\n0.png,0\n1.png,NA\n")
    with pytest.raises(UserError, match=r"m.csv: 1 row\(s\) have no label \(empty or NA\) on line\(s\) 3"):
        CsvDataset(tmp_path / "m.csv")


def test_probe_labels_csv_reads_labels_the_same_way(tmp_path):
    import h5py

    from histodistill.eval.probe import load_patch_features

    with h5py.File(tmp_path / "f.h5", "w") as handle:
        handle["features"] = np.ones((4, 2), np.float32)
        handle["labels"] = np.zeros(4, np.int64)
        handle["paths"] = np.array(["a", "b", "c", "d"], dtype=object)
    (tmp_path / "l.csv").write_text("path,label\na,0\nb,1.0\nc,0.0\nd,1\n")
    data = load_patch_features(tmp_path / "f.h5", tmp_path / "l.csv")
    assert data.classes == ["0", "1"] and data.labels.tolist() == [0, 1, 0, 1]
    (tmp_path / "l.csv").write_text("path,label\na,Tumor\nb,tumor\n")
    with pytest.raises(UserError, match="differ only in case"):
        load_patch_features(tmp_path / "f.h5", tmp_path / "l.csv")
