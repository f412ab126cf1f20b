"""Coords files of ours, CLAM's create_patches_fp and TRIDENT, read into one form; finding their slides."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from histodistill.errors import UserError
from histodistill.wsi.coords import coords_files, find_slide, read_coords, tiling_attrs
from histodistill.wsi.tiling import tile_slide

COORDS = np.array([[0, 0], [512, 0], [0, 512]], np.int64)


def write_clam(path, patch_size=256, patch_level=1, downsample=(2.0, 2.0)):
    """The attributes CLAM's WholeSlideImage.process_contour writes on `coords`, arrays included."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as h5:
        h5["coords"] = COORDS
        h5["coords"].attrs.update(
            patch_size=patch_size,
            patch_level=patch_level,
            downsample=np.array(downsample),
            downsampled_level_dim=np.array([512, 384]),
            level_dim=np.array([512, 384]),
            name=path.stem,
            save_path=str(path.parent),
        )
    return path


def write_trident(folder, name="slide", patch_size=256, level0=40, target=20):
    """TRIDENT's WSI.extract_tissue_coords: `patches/<name>_patches.h5`, attrs on `coords`."""
    path = folder / "patches" / f"{name}_patches.h5"
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as h5:
        h5["coords"] = COORDS
        h5["coords"].attrs.update(
            patch_size=patch_size,
            patch_size_level0=patch_size * level0 // target,
            level0_magnification=level0,
            target_magnification=target,
            overlap=0,
            name=name,
            savetodir=str(folder),
        )
    return path


def test_clam_coords_give_patch_size_level0_from_the_downsample(tmp_path):
    coords, attrs = read_coords(write_clam(tmp_path / "patches" / "case_1.h5"))
    np.testing.assert_array_equal(coords, COORDS)
    assert attrs["patch_size_level0"] == 512 and attrs["slide_id"] == "case_1"
    assert "slide_path" not in attrs and "target_mpp" not in attrs


def test_trident_coords_name_the_slide_without_the_patches_suffix(tmp_path):
    coords, attrs = read_coords(write_trident(tmp_path, "case_2"))
    assert attrs["patch_size_level0"] == 512 and attrs["slide_id"] == "case_2"
    assert tiling_attrs(attrs) == {
        "patch_size_level0": 512,
        "patch_size": 256,
        "target_magnification": 20,
        "level0_magnification": 40,
        "overlap": 0,
    }


def test_our_coords_keep_every_tiling_attribute(tiny_slide, tmp_path):
    tile_slide(tiny_slide.path, tmp_path / "out", patch_size=128, target_mpp=1.0)
    _, attrs = read_coords(tmp_path / "out" / "patches" / "tiny_slide.h5")
    assert list(tiling_attrs(attrs)) == [
        "patch_size_level0",
        "patch_size",
        "patch_level",
        "target_mpp",
        "target_magnification",
        "level0_magnification",
        "mpp",
        "overlap",
    ]
    assert attrs["patch_size_level0"] == 256 and attrs["slide_path"] == str(tiny_slide.path.resolve())


def test_an_unusable_coords_file_names_the_file_and_the_missing_attributes(tmp_path):
    path = tmp_path / "bare.h5"
    with h5py.File(path, "w") as h5:
        h5["coords"] = COORDS
    with pytest.raises(
        UserError,
        match=r"bare.h5: unusable coords file: missing attribute\(s\) patch_size, "
        r"patch_size_level0 \(or CLAM's patch_level \+ downsample",
    ):
        read_coords(path)
    with h5py.File(path, "w") as h5:
        h5["features"] = np.zeros((3, 4))
    with pytest.raises(UserError, match=r"bare.h5: not a coords file: it has no `coords` dataset"):
        read_coords(path)


def test_the_patches_folder_itself_is_accepted(tmp_path):
    write_clam(tmp_path / "run" / "patches" / "a.h5")
    assert coords_files(tmp_path / "run") == coords_files(tmp_path / "run" / "patches")
    with pytest.raises(UserError, match="no coords files"):
        coords_files(tmp_path / "empty")


def test_slides_are_found_in_a_folder_by_id_and_extension(tmp_path):
    coords_path = write_clam(tmp_path / "patches" / "case_1.h5")
    _, attrs = read_coords(coords_path)
    slides = tmp_path / "slides"
    slides.mkdir()
    (slides / "case_1.svs").write_bytes(b"")
    (slides / "case_1.ndpi").write_bytes(b"")
    assert find_slide(coords_path, attrs, slides, ".ndpi") == slides / "case_1.ndpi"
    assert find_slide(coords_path, attrs, slides, "svs") == slides / "case_1.svs"
    with pytest.raises(UserError, match=r"case_1.h5: no slide case_1.mrxs in `slides_dir="):
        find_slide(coords_path, attrs, slides, ".mrxs")
    with pytest.raises(
        UserError, match=r"case_1.h5: the coords do not name their slide .*pass `slides_dir=DIR`"
    ):
        find_slide(coords_path, attrs)
    with pytest.raises(UserError, match=r"its slide .*gone.svs no longer exists; pass `slides_dir=DIR`"):
        find_slide(coords_path, {**attrs, "slide_path": str(tmp_path / "gone.svs")})
