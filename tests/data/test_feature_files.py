"""The one reader of feature folders: our layout, CLAM's and TRIDENT's, and every way a file can be bad."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from conftest import tile_grid as grid
from conftest import write_clam_features as write_clam
from conftest import write_trident_features as write_trident
from histodistill.data.feature_files import (
    UNREADABLE_ATTR,
    is_finished,
    load_slides,
    open_feature_folder,
    problems_of,
    read_slide_features,
    write_slide_features,
)
from histodistill.errors import UserError

DIM = 6


def features_of(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)


def write_ours(path, features, coords=None):
    """As `histodistill extract` writes: features float32, coords int64, tiling attrs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as handle:
        handle["features"] = features
        handle["coords"] = grid(len(features)).astype(np.int64) if coords is None else coords
        handle["coords"].attrs["patch_size_level0"] = 256


def test_our_folder_skips_hidden_temporary_and_other_files(tmp_path):
    for slide_id in ("s1", "s2"):
        write_ours(tmp_path / f"{slide_id}.h5", features_of(3))
    (tmp_path / ".s1.k3j2h1.tmp.h5").write_bytes(b"half")  # left by a killed run
    (tmp_path / "._s1.h5").write_bytes(b"\x00\x05")  # a macOS resource fork
    (tmp_path / "s3.h5.lock").touch()
    (tmp_path / "extractor.json").write_text("{}")
    folder = open_feature_folder(tmp_path)
    assert sorted(folder.files) == ["s1", "s2"] and folder.directory == tmp_path


def test_clam_feat_dir_prefers_h5_files_for_their_coords(tmp_path):
    write_clam(tmp_path, "slide_1", features_of(5))
    folder = open_feature_folder(tmp_path)
    assert folder.directory == tmp_path / "h5_files" and folder.layout == "CLAM h5_files"
    slide = load_slides(folder, ["slide_1"])["slide_1"]
    np.testing.assert_array_equal(slide.features, features_of(5))
    assert slide.coords.dtype == np.int64 and slide.coords.tolist() == grid(5).tolist()


def test_a_clam_h5_without_its_pt_is_an_unfinished_slide(tmp_path):
    write_clam(tmp_path, "done", features_of(5))
    write_clam(tmp_path, "killed", features_of(5))
    (tmp_path / "pt_files" / "killed.pt").unlink()  # CLAM appends to the .h5 and saves the .pt last
    folder = open_feature_folder(tmp_path)
    assert sorted(folder.files) == ["done"]
    with pytest.raises(
        UserError, match=r"CLAM did not finish 1 slide\(s\) .*: killed have an .h5 but no pt_files"
    ):
        load_slides(folder, ["done", "killed"])


def test_clam_pt_files_alone_are_read_safely_without_coords(tmp_path):
    write_clam(tmp_path, "slide_1", features_of(5))
    for path in (tmp_path / "h5_files").iterdir():
        path.unlink()
    folder = open_feature_folder(tmp_path)
    assert folder.layout == "CLAM pt_files"
    slide = read_slide_features(folder.files["slide_1"])
    np.testing.assert_array_equal(slide.features, features_of(5))
    assert slide.coords is None


def test_a_pickled_object_in_a_pt_file_is_refused_not_run(tmp_path):
    torch.save({"features": torch.zeros(2, DIM), "note": np.dtype("float32")}, tmp_path / "s.pt")
    with pytest.raises(UserError, match="s.pt cannot be read as a tensor"):
        read_slide_features(tmp_path / "s.pt")


def test_trident_job_dir_or_its_features_folder(tmp_path):
    folder = write_trident(tmp_path / "job", "TCGA-1", features_of(4))
    (folder / "TCGA-2.h5.lock").touch()  # another worker is on it
    for given in (tmp_path / "job", folder):
        found = open_feature_folder(given)
        assert found.directory == folder and sorted(found.files) == ["TCGA-1"]
    slide = load_slides(found, ["TCGA-1"])["TCGA-1"]
    assert slide.attrs["patch_size_level0"] == 512 and slide.coords.shape == (4, 2)
    write_trident(tmp_path / "job", "TCGA-1", features_of(4), encoder="conch_v15")
    with pytest.raises(UserError, match="holds 2 feature folders"):
        open_feature_folder(tmp_path / "job")


def test_one_truncated_file_of_six_is_named(tmp_path):
    for i in range(6):
        write_ours(tmp_path / f"s{i}.h5", features_of(20, i))
    data = (tmp_path / "s3.h5").read_bytes()
    (tmp_path / "s3.h5").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError) as info:
        load_slides(open_feature_folder(tmp_path), [f"s{i}" for i in range(6)])
    message = str(info.value)
    assert "1 features file(s) cannot be used" in message and "s3.h5" in message and "\n" not in message
    assert "s2.h5" not in message


@pytest.mark.parametrize(("bad_rows", "value"), [(5, np.nan), (1, np.inf)])
def test_non_finite_rows_are_counted_per_file(tmp_path, bad_rows, value):
    features = features_of(12)
    features[:bad_rows, 1] = value
    write_ours(tmp_path / "bad.h5", features)
    write_ours(tmp_path / "good.h5", features_of(12))
    with pytest.raises(UserError) as info:
        load_slides(open_feature_folder(tmp_path), ["good", "bad"])
    assert f"bad.h5 ({bad_rows} of 12 rows)" in str(info.value) and "good.h5" not in str(info.value)


def test_rows_and_dimension_problems(tmp_path):
    write_ours(tmp_path / "short.h5", features_of(4), coords=grid(3).astype(np.int64))
    with pytest.raises(UserError, match="4 feature rows but 3 coords rows"):
        read_slide_features(tmp_path / "short.h5")
    write_ours(tmp_path / "a.h5", features_of(4))
    write_ours(tmp_path / "b.h5", features_of(4))
    write_ours(tmp_path / "wide.h5", np.zeros((4, DIM + 2), np.float32))
    with pytest.raises(UserError, match=rf"most are {DIM}, but wide.h5 \({DIM + 2}\)"):
        load_slides(open_feature_folder(tmp_path), ["a", "b", "wide"])
    assert problems_of(tmp_path / "a.h5", rows=4, dim=DIM) is None
    assert "features (4, 6) and 3 coords rows" in problems_of(tmp_path / "short.h5")
    assert "has 4 rows but its coords file has 5" in problems_of(tmp_path / "a.h5", rows=5, dim=DIM)
    assert "dimension 6, the extractor gives 8" in problems_of(tmp_path / "a.h5", rows=4, dim=8)


@pytest.mark.parametrize("make", ["missing", "file", "empty folder", "foreign files"])
def test_folders_without_features_are_explained(tmp_path, make):
    given = tmp_path / "given"
    if make == "file":
        given.write_text("x")
    elif make != "missing":
        given.mkdir()
        if make == "foreign files":
            (given / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="`features="):
        open_feature_folder(given)


def test_what_the_writer_writes_the_reader_reads_and_the_rerun_check_accepts(tmp_path):
    """The format's owner round-trips: float64/int32 in, float32/int64 out; tiling attrs on `coords`, slide
    attrs on the file; a file leaving out unreadable tiles is finished for its coords file, a shorter one is
    not."""
    coords_path = tmp_path / "patches" / "s1.h5"
    coords_path.parent.mkdir()
    with h5py.File(coords_path, "w") as handle:
        handle["coords"] = grid(5)
    target = tmp_path / "features" / "s1.h5"
    write_slide_features(
        target,
        features_of(4).astype(np.float64),
        grid(4).astype(np.int32),
        {"slide_id": "s1", UNREADABLE_ATTR: 1},
        {"patch_size_level0": 256},
    )
    slide = read_slide_features(target)
    assert slide.features.dtype == np.float32 and slide.coords.dtype == np.int64
    np.testing.assert_array_equal(slide.coords, grid(4))
    with h5py.File(target) as handle:
        assert dict(handle["coords"].attrs) == {"patch_size_level0": 256} and handle.attrs["slide_id"] == "s1"
    assert is_finished(target, coords_path, DIM) and not is_finished(target, coords_path, DIM + 1)
    write_slide_features(target, features_of(3), grid(3), {"slide_id": "s1"})  # 3 of 5 rows, none unreadable
    assert not is_finished(target, coords_path, DIM)
