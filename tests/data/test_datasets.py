"""Patch datasets: labels and shapes, lazy HDF5 reads, and the error messages users meet."""

from __future__ import annotations

import pickle

import h5py
import numpy as np
import pytest
import torch

from conftest import make_image_folder
from histodistill.data.datasets import CsvDataset, HDF5ArrayDataset, ImageFolderDataset
from histodistill.errors import UserError


def test_image_folder_labels_follow_sorted_class_folders(tmp_path):
    make_image_folder(tmp_path, classes=("tumor", "adipose"), per_class=2, size=8)
    dataset = ImageFolderDataset(tmp_path)
    assert dataset.classes == ["adipose", "tumor"] and len(dataset) == 4
    image, label = dataset[3]
    assert image.shape == (3, 8, 8) and image.dtype == torch.uint8 and label == 1
    dataset.transform = lambda x: x.float() / 255
    assert dataset[0][0].dtype == torch.float32


def test_image_folder_errors_name_the_problem(tmp_path):
    make_image_folder(tmp_path, classes=("a",), per_class=1, size=8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty holds no images"):
        ImageFolderDataset(tmp_path)
    (tmp_path / "empty").rmdir()
    (tmp_path / "a" / "broken.png").write_bytes(b"not a png")
    dataset = ImageFolderDataset(tmp_path)
    with pytest.raises(UserError, match="broken.png"):
        [dataset[i] for i in range(len(dataset))]
    with pytest.raises(UserError, match="does not exist"):
        ImageFolderDataset(tmp_path / "missing")


def test_csv_paths_are_relative_to_the_csv_and_splits_share_labels(tmp_path):
    make_image_folder(tmp_path / "img", classes=("x", "y"), per_class=2, size=8)
    rows = [
        "path,label,split",
        "img/x/0.png,x,train",
        "img/y/0.png,y,train",
        "img/x/1.png,x,val",
        "img/y/1.png,y,val",
    ]
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    val = CsvDataset(tmp_path / "m.csv", split="val")
    assert val.classes == ["x", "y"] and [label for _, label in val.samples] == [0, 1]
    assert val[1][0].shape == (3, 8, 8)
    with pytest.raises(UserError, match=r"labels \['y'\] are not in classes"):
        CsvDataset(tmp_path / "m.csv", classes=["x"])
    with pytest.raises(UserError, match="no rows with split == 'test'"):
        CsvDataset(tmp_path / "m.csv", split="test")
    (tmp_path / "bad.csv").write_text("file,label\na.png,x\n")
    with pytest.raises(UserError, match=r"lacks column\(s\) \['path'\]"):
        CsvDataset(tmp_path / "bad.csv")


def test_csv_integer_labels_sort_numerically(tmp_path):
    make_image_folder(tmp_path, classes=("a",), per_class=1, size=8)
    (tmp_path / "m.csv").write_text("path,label\na/0.png,10\na/0.png,2\n")
    assert CsvDataset(tmp_path / "m.csv").classes == ["2", "10"]


def write_pcam(tmp_path, n=5, labels=None):
    x = np.random.default_rng(0).integers(0, 256, (n, 12, 12, 3), dtype=np.uint8)
    y = np.array(labels if labels is not None else [i % 2 for i in range(n)], np.uint8).reshape(-1, 1, 1, 1)
    with h5py.File(tmp_path / "x.h5", "w") as handle:
        handle["x"] = x
    with h5py.File(tmp_path / "y.h5", "w") as handle:
        handle["y"] = y
    return x, y


def test_hdf5_reads_pcam_layout_lazily_and_survives_pickling(tmp_path):
    x, _ = write_pcam(tmp_path)
    dataset = HDF5ArrayDataset(tmp_path / "x.h5", tmp_path / "y.h5")
    assert len(dataset) == 5 and dataset.classes == ["0", "1"] and dataset._handle is None
    image, label = dataset[3]
    assert torch.equal(image, torch.from_numpy(x[3]).permute(2, 0, 1)) and label == 1
    clone = pickle.loads(pickle.dumps(dataset))  # what a spawned DataLoader worker receives
    assert clone._handle is None and torch.equal(clone[3][0], image)


def test_hdf5_mismatched_lengths_are_a_user_error(tmp_path):
    write_pcam(tmp_path)
    with h5py.File(tmp_path / "y.h5", "w") as handle:
        handle["y"] = np.zeros((4, 1, 1, 1), np.uint8)
    with pytest.raises(UserError, match="has 5 images but .*y.h5:y has 4 labels"):
        HDF5ArrayDataset(tmp_path / "x.h5", tmp_path / "y.h5")
    with pytest.raises(UserError, match="no dataset 'images'"):
        HDF5ArrayDataset(tmp_path / "x.h5", tmp_path / "y.h5", x_key="images")


def test_hidden_files_and_folders_are_not_images(tmp_path):
    make_image_folder(tmp_path, classes=("a", "b"), per_class=2, size=8)
    (tmp_path / "a" / "._0.png").write_bytes(b"\x00\x05\x16\x07")  # a macOS resource fork
    (tmp_path / "a" / ".ipynb_checkpoints").mkdir()
    (tmp_path / "a" / ".ipynb_checkpoints" / "0-checkpoint.png").write_bytes(b"")
    (tmp_path / ".thumbnails").mkdir()
    dataset = ImageFolderDataset(tmp_path)
    assert dataset.classes == ["a", "b"] and len(dataset) == 4
