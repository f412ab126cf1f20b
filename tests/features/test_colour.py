"""The colour-only control: LAB mean and sd of each tile's tissue, in extract's file layout."""

from __future__ import annotations

import h5py
import numpy as np

from histodistill.features.colour import colour_features
from histodistill.samples.stain_norm import TISSUE_LIGHTNESS, lab_stats
from histodistill.wsi.slide import open_slide
from histodistill.wsi.tiff_writer import write_pyramid_tiff
from histodistill.wsi.tiling import tile_slide


def test_colour_features_are_each_tiles_lab_statistics(tmp_path):
    rng = np.random.default_rng(0)
    # glass around two tissue tiles, so tissue detection has a contrast
    image = np.full((192, 192, 3), 242, np.uint8)
    image[:64, :64] = np.clip(rng.normal((200, 100, 150), 10, (64, 64, 3)), 0, 255)  # pink tile
    image[:64, 64:128] = np.clip(rng.normal((90, 60, 160), 10, (64, 64, 3)), 0, 255)  # purple tile
    write_pyramid_tiff(tmp_path / "s.tif", image, mpp=0.5)
    tile_slide(tmp_path / "s.tif", tmp_path / "tiles", target_mpp=0.5, patch_size=64, min_tissue=0.1)
    folder = colour_features(tmp_path / "tiles", tmp_path / "out")
    with h5py.File(folder / "s.h5") as handle:
        features, coords = handle["features"][:], handle["coords"][:]
    assert sorted(map(tuple, coords)) == [(0, 0), (64, 0)]
    assert features.shape == (2, 6) and features.dtype == np.float32
    for feature, (x, y) in zip(features, coords, strict=True):
        tile = open_slide(tmp_path / "s.tif").read_region((int(x), int(y)), 0, (64, 64))  # as stored (JPEG)
        np.testing.assert_allclose(feature, np.concatenate(lab_stats(tile, TISSUE_LIGHTNESS)), rtol=1e-3)
    assert abs(features[0, 1] - features[1, 1]) > 5  # the two tiles differ in colour


def test_corrupt_tiles_are_left_out_named_and_recorded_as_extract_does(tmp_path, capsys):
    # Issue 29: colour features stopped at the first tile the slide file cannot give.
    from conftest import write_corrupt_slide
    from histodistill.data.feature_files import UNREADABLE_ATTR, UNREADABLE_CSV

    path, (x, y) = write_corrupt_slide(tmp_path / "corrupt.tif")
    tile_slide(path, tmp_path / "tiles", target_mpp=0.5, patch_size=128)
    folder = colour_features(tmp_path / "tiles", tmp_path / "out")
    damaged = [(x, y), (x + 128, y), (x, y + 128), (x + 128, y + 128)]
    with h5py.File(folder / "corrupt.h5") as handle:
        assert handle["features"].shape == (60, 6) and handle.attrs[UNREADABLE_ATTR] == 4
        assert {tuple(c) for c in handle["coords"][:].tolist()}.isdisjoint(damaged)
        assert np.isfinite(handle["features"][:]).all()
    assert (folder / UNREADABLE_CSV).read_text().splitlines() == [
        "slide_id,x,y",
        *(f"corrupt,{a},{b}" for a, b in damaged),
    ]
    [warning] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: slide")]
    assert warning.startswith("warning: slide corrupt: 4 of 64 tiles cannot be read from the slide file")
