"""The labeled nuclei task on a tiny synthetic image with known nuclei, and on the real hgsc_nest when
cached."""

from __future__ import annotations

import json
import struct
import sys
import types

import numpy as np
import pytest
from PIL import Image

from histodistill import cli
from histodistill.errors import UserError
from histodistill.samples import nuclei
from histodistill.samples.nuclei import (
    HGSC_CLASSES,
    NucleiTask,
    build_nuclei_task,
    choose_split_x,
    class_counts,
    crop_around,
    find_nuclei,
    spatial_split,
    stratified_subset,
    subsample,
    write_image_folder,
)

WIDTH, HEIGHT = 200, 120
# (instance id, centre x, centre y, majority type, minority type): ids need not be contiguous.
KNOWN = [(1, 20, 30, 1, 2), (2, 60, 90, 2, 3), (5, 100, 60, 3, 1), (7, 150, 20, 2, 1), (9, 196, 100, 1, 3)]
UNTYPED_ID = 11  # an instance whose pixels have no type: no label, not in the task


def _coordinate_image() -> np.ndarray:
    """(H, W, 3) uint8 whose red channel is the column and green the row: crops reveal where they came
    from."""
    ys, xs = np.mgrid[:HEIGHT, :WIDTH]
    return np.stack([xs, ys, np.zeros_like(xs)], axis=-1).astype(np.uint8)


def _masks() -> tuple[np.ndarray, np.ndarray]:
    """Square 5x5 nuclei (centroid exactly at the centre): 15 pixels of the majority type, 10 of another."""
    instance = np.zeros((HEIGHT, WIDTH), np.int32)
    kind = np.zeros((HEIGHT, WIDTH), np.int32)
    for nucleus_id, x, y, major, minor in KNOWN:
        instance[y - 2 : y + 3, x - 2 : x + 3] = nucleus_id
        kind[y - 2 : y + 3, x - 2 : x + 3] = major
        kind[y - 2 : y, x - 2 : x + 3] = minor  # top two rows: 10 of 25 pixels
    instance[5:8, 80:83] = UNTYPED_ID
    return instance, kind


def test_find_nuclei_gives_centroids_and_majority_types():
    found = find_nuclei(*_masks())
    assert found.ids.tolist() == [k[0] for k in KNOWN]
    assert found.centres_xy.tolist() == [[k[1], k[2]] for k in KNOWN]
    assert found.types.tolist() == [k[3] for k in KNOWN]


def test_crops_are_centred_and_reflect_padded_at_the_border():
    image = _coordinate_image()
    crops = crop_around(image, np.array([[50, 40], [0, 0]]), size=8)
    assert crops.shape == (2, 8, 8, 3) and crops.dtype == np.uint8
    assert crops[0, 4, 4, :2].tolist() == [50, 40]  # centre pixel at index size // 2
    assert crops[0, 0, 0, :2].tolist() == [46, 36]
    assert crops[1, 4, 4, :2].tolist() == [0, 0]
    assert crops[1, 4, 2, :2].tolist() == [2, 0]  # two columns left of the border mirror column 2
    assert crops[1, 1, 4, :2].tolist() == [0, 3]


def test_split_respects_the_guard_band():
    xs = np.array([10, 92, 93, 100, 107, 108, 150])
    train, test = spatial_split(xs, size=16, split_x=100)
    # a 16-px crop centred at x spans [x - 8, x + 8): it ends by 100 up to x = 92, starts at 100 from x = 108
    assert train.tolist() == [0, 1] and test.tolist() == [5, 6]


def test_choose_split_x_leaves_the_test_fraction_on_the_right():
    xs = np.arange(1000)
    split = choose_split_x(xs, 0.3)
    assert np.mean(xs >= split) == pytest.approx(0.3, abs=0.002)
    with pytest.raises(ValueError):
        choose_split_x(xs, 1.0)


def test_task_has_no_pixel_shared_between_train_and_test():
    image = _coordinate_image()
    task = build_nuclei_task(image, *_masks(), HGSC_CLASSES, crop_size=32, split_x=140)
    # train: centres 20, 60, 100 (crop ends at 116); 150 is in the band; test: 196 (crop starts at 180)
    assert task.train_labels.tolist() == [0, 1, 2] and task.test_labels.tolist() == [0]
    assert task.train_images.shape == (3, 32, 32, 3) and task.test_images.shape == (1, 32, 32, 3)
    assert task.train_images[..., 0].max() < 140 <= task.test_images[..., 0].min()
    again = build_nuclei_task(image, *_masks(), HGSC_CLASSES, crop_size=32, split_x=140)
    for first, second in zip(task[:4], again[:4], strict=True):
        np.testing.assert_array_equal(first, second)


def test_stratified_subset_keeps_class_shares_and_is_seeded():
    labels = np.array([0] * 50 + [1] * 30 + [2] * 3)
    subset = stratified_subset(labels, 0.2, seed=1)
    assert np.bincount(labels[subset]).tolist() == [10, 6, 1]  # at least one of the rare class
    assert np.all(np.diff(subset) > 0)
    np.testing.assert_array_equal(subset, stratified_subset(labels, 0.2, seed=1))
    assert not np.array_equal(subset, stratified_subset(labels, 0.2, seed=2))
    with pytest.raises(ValueError):
        stratified_subset(labels, 0.0, seed=0)


def test_subsample_keeps_a_stratified_share_of_each_split_and_its_pairs():
    train_labels = np.array([0] * 40 + [1] * 20 + [2] * 10)
    test_labels = np.array([0] * 10 + [1] * 5 + [2] * 0)
    # each crop's pixels hold its own index, so a subsampled crop can be matched to its label
    task = NucleiTask(
        np.arange(70).reshape(70, 1, 1, 1) * np.ones((1, 2, 2, 3), int),
        train_labels,
        np.arange(15).reshape(15, 1, 1, 1) * np.ones((1, 2, 2, 3), int),
        test_labels,
        HGSC_CLASSES,
    )
    half = subsample(task, 0.5)
    assert np.bincount(half.train_labels).tolist() == [20, 10, 5]
    assert np.bincount(half.test_labels, minlength=3).tolist() == [5, 2, 0]  # round(2.5) = 2
    np.testing.assert_array_equal(train_labels[half.train_images[:, 0, 0, 0]], half.train_labels)
    np.testing.assert_array_equal(test_labels[half.test_images[:, 0, 0, 0]], half.test_labels)
    assert subsample(task, 1.0) is task


@pytest.fixture
def synthetic_hgsc(monkeypatch):
    """Make the hgsc_nest loader return the synthetic image and masks: write_image_folder runs offline."""
    calls = []

    def load():
        calls.append(1)
        return (_coordinate_image(), *_masks())

    monkeypatch.setattr(nuclei, "load_hgsc", load)
    return calls


def test_write_image_folder_layout_summary_and_reuse(tmp_path, synthetic_hgsc):
    out = write_image_folder(tmp_path / "task", crop_size=16, test_fraction=0.3)
    summary = json.loads((out / "nuclei_task.json").read_text())
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*.png"))
    counts = {split: {name: 0 for name in HGSC_CLASSES} for split in ("train", "test")}
    for name in files:
        split, class_name, _ = name.split("/")
        counts[split][class_name] += 1
    # split at x = 140 (70 % quantile of 20, 60, 100, 150, 196); 16-px crops: none straddles it
    assert summary["split_x"] == 140
    assert (
        counts
        == summary["counts"]
        == {
            "train": {"connective": 1, "inflammatory": 1, "neoplastic": 1},
            "test": {"connective": 1, "inflammatory": 1, "neoplastic": 0},
        }
    )
    assert (out / "test" / "neoplastic").is_dir()  # empty, but present so class indices agree across splits
    crop = np.asarray(Image.open(out / "test" / "connective" / "00001.png"))
    assert crop.shape == (16, 16, 3) and crop[8, 8, :2].tolist() == [196, 100]

    assert write_image_folder(out, crop_size=16, test_fraction=0.3) == out
    assert len(synthetic_hgsc) == 1  # finished task with the same settings: not rebuilt
    with pytest.raises(UserError, match="`overwrite=True`"):
        write_image_folder(out, crop_size=8, test_fraction=0.3)
    (out / "train" / "stale").mkdir()
    write_image_folder(out, crop_size=8, test_fraction=0.3, overwrite=True)
    assert not (out / "train" / "stale").exists()
    assert json.loads((out / "nuclei_task.json").read_text())["crop_size"] == 8

    # A folder written before `fraction` existed held every nucleus: reused at 1, refused at another share.
    summary = json.loads((out / "nuclei_task.json").read_text())
    del summary["fraction"]
    (out / "nuclei_task.json").write_text(json.dumps(summary))
    assert write_image_folder(out, crop_size=8, test_fraction=0.3) == out
    with pytest.raises(UserError, match="'fraction': 1.0"):
        write_image_folder(out, crop_size=8, test_fraction=0.3, fraction=0.5)


def test_write_image_folder_refuses_foreign_folders(tmp_path, synthetic_hgsc):
    (tmp_path / "train" / "tumour").mkdir(parents=True)
    (tmp_path / "train" / "tumour" / "x.png").write_bytes(b"")
    with pytest.raises(UserError, match="`overwrite=True`"):
        write_image_folder(tmp_path)
    assert synthetic_hgsc == []


def test_cli_make_nuclei_and_make_slides_pass_their_options(tmp_path, synthetic_hgsc, monkeypatch, capsys):
    assert cli.main(["samples", "make-nuclei", "--out", str(tmp_path / "n"), "--crop-size", "8"]) == 0
    assert json.loads((tmp_path / "n" / "nuclei_task.json").read_text())["crop_size"] == 8

    seen = {}
    fake = types.ModuleType("histodistill.samples.synthetic_slides")
    fake.make_slides = lambda out_dir, **options: seen.update(out_dir=out_dir, **options) or "labels.csv"
    monkeypatch.setitem(sys.modules, "histodistill.samples.synthetic_slides", fake)
    assert cli.main(["samples", "make-slides", "--out", "slides", "--seed", "3"]) == 0
    assert seen == {"out_dir": "slides", "seed": 3}  # --n-slides not given: the generator's default applies
    assert capsys.readouterr().out.strip().endswith("labels.csv")


@pytest.mark.samples
def test_real_task_counts(sample_file):
    for name in ("hgsc_nest", "hgsc_nest_inst_mask", "hgsc_nest_type_mask"):
        sample_file(name)
    _, instance, kind = nuclei.load_hgsc()
    found = find_nuclei(instance, kind)
    # the parquet lists 374 connective nuclei; one of them has no pixels of its own in the instance raster
    assert class_counts(found.types - 1, HGSC_CLASSES) == {
        "connective": 373,
        "inflammatory": 633,
        "neoplastic": 288,
    }
    task = nuclei.load_nuclei_task(crop_size=64, test_fraction=0.3)
    assert task.train_images.shape == (861, 64, 64, 3) and task.test_images.shape == (350, 64, 64, 3)
    assert class_counts(task.train_labels, HGSC_CLASSES) == {
        "connective": 162,
        "inflammatory": 510,
        "neoplastic": 189,
    }
    assert class_counts(task.test_labels, HGSC_CLASSES) == {
        "connective": 198,
        "inflammatory": 84,
        "neoplastic": 68,
    }


def _polygon_vertex_mean(wkb: bytes) -> tuple[float, float]:
    """Mean of the exterior ring of a WKB polygon: inside a (near-convex) nucleus outline."""
    order = "<" if wkb[0] == 1 else ">"
    (geometry_type,) = struct.unpack(order + "I", wkb[1:5])
    assert geometry_type == 3  # Polygon
    (num_points,) = struct.unpack(order + "I", wkb[9:13])  # first ring: after the ring count
    # (P, 2) x, y
    points = np.frombuffer(wkb[13 : 13 + 16 * num_points], dtype=order + "f8").reshape(num_points, 2)
    return tuple(points.mean(0))


@pytest.mark.samples
def test_type_values_match_the_parquet_class_names(sample_file):
    parquet = pytest.importorskip("pyarrow.parquet")
    table = parquet.read_table(sample_file("hgsc_nest_table"))
    with np.load(sample_file("hgsc_nest_type_mask")) as data:
        kind = data["nuc_raster"]
    names_by_value: dict[int, set[str]] = {}
    for wkb, class_name in zip(
        table.column("geometry").to_pylist(), table.column("class_name").to_pylist(), strict=True
    ):
        x, y = _polygon_vertex_mean(wkb)
        names_by_value.setdefault(int(kind[round(y), round(x)]), set()).add(class_name)
    assert names_by_value == {value: {name} for value, name in enumerate(HGSC_CLASSES, start=1)}
