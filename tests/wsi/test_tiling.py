"""Tiling: grid arithmetic, tissue fractions, exact coords on a known slide, h5 layout, skip/resume."""

from __future__ import annotations

import json
from types import SimpleNamespace

import h5py
import numpy as np
import pytest

from conftest import make_tissue_image
from histodistill.errors import ConfigError, UserError
from histodistill.wsi.coords import read_coords
from histodistill.wsi.tiff_writer import write_pyramid_tiff
from histodistill.wsi.tiling import (
    OutputPaths,
    grid_coords,
    magnification_to_mpp,
    tile_slide,
    tissue_fractions,
)
from histodistill.wsi.tissue import TissueConfig


def reference_coords(slide_size, boxes, patch0, stride0, min_tissue):
    """Tiles kept by pure geometry: overlap of each grid tile with the tissue boxes."""
    width, height = slide_size
    kept = []
    for y in range(0, height - patch0 + 1, stride0):
        for x in range(0, width - patch0 + 1, stride0):
            covered = sum(
                max(0, min(x + patch0, x1) - max(x, x0)) * max(0, min(y + patch0, y1) - max(y, y0))
                for x0, y0, x1, y1 in boxes
            )
            if covered / patch0**2 >= min_tissue:
                kept.append((x, y))
    return np.array(kept, np.int64).reshape(-1, 2)


def test_grid_coords_arithmetic():
    coords = grid_coords((1024, 768), 128, 0, 1.0)
    assert coords.shape == (48, 2) and coords.dtype == np.int64
    assert coords[:9].tolist() == [[x, 0] for x in range(0, 1024, 128)] + [[0, 128]]  # row-major
    assert grid_coords((1024, 768), 128, 64, 1.0).shape == (15 * 11, 2)  # stride 64: x <= 896, y <= 640
    assert (grid_coords((1024, 768), 64, 0, 2.0) == coords).all()  # 64 px at 1.0 mpp = 128 at 0.5
    # 256 px at 0.5 mpp on a 0.499 mpp slide: 256.51 level-0 px a tile, columns at round(k * 256.51).
    odd = grid_coords((2220, 2967), 256, 0, 0.5 / 0.499)
    xs = np.unique(odd[:, 0])
    assert xs.tolist() == [round(k * 256 * 0.5 / 0.499) for k in range(8)]
    assert xs[-1] + 257 <= 2220
    assert grid_coords((100, 100), 128, 0, 1.0).shape == (0, 2)


def test_tissue_fractions_by_hand():
    mask = np.zeros((4, 8), bool)  # 2 level-0 px per mask px on a 16 x 8 slide
    mask[:, :2] = True
    mask[0, 2] = True
    coords = np.array([[0, 0], [4, 0], [8, 0]])
    # Tile (0,0) of 8 px = mask[0:4, 0:4]: 8 + 1 of 16. Tile (4,0) = mask[0:4, 2:6]: 1 of 16. Tile (8,0): 0.
    np.testing.assert_allclose(tissue_fractions(mask, coords, 8, (16, 8)), [9 / 16, 1 / 16, 0])


def test_magnification_uses_the_slides_objective_power():
    assert magnification_to_mpp(SimpleNamespace(objective_power=40, mpp=0.23), 20) == pytest.approx(0.46)
    assert magnification_to_mpp(SimpleNamespace(objective_power=None, mpp=0.23), 20) == 0.5
    assert magnification_to_mpp(SimpleNamespace(objective_power=None, mpp=0.23), 40) == 0.25


def test_tiles_of_the_synthetic_slide_are_exactly_its_boxes(tiny_slide, tmp_path):
    result = tile_slide(tiny_slide.path, tmp_path / "out", target_mpp=0.5, patch_size=128)
    assert result.status == "ok" and result.n_tiles == 10
    coords, attrs = read_coords(tmp_path / "out" / "patches" / "tiny_slide.h5")
    # Box (128,128)-(512,384) holds 3 x 2 tiles of 128, box (640,384)-(896,640) 2 x 2.
    expected = [
        (128, 128),
        (256, 128),
        (384, 128),
        (128, 256),
        (256, 256),
        (384, 256),
        (640, 384),
        (768, 384),
        (640, 512),
        (768, 512),
    ]
    assert coords.tolist() == [list(c) for c in expected]
    assert attrs == dict(
        patch_size=128,
        patch_level=0,
        patch_size_level0=128,
        mpp=0.5,
        target_mpp=0.5,
        overlap=0,
        slide_path=str(tiny_slide.path.resolve()),
        slide_id="tiny_slide",
        level0_magnification=20.0,
        target_magnification=20.0,
    )
    with h5py.File(tmp_path / "out" / "patches" / "tiny_slide.h5") as h5:
        assert h5["coords"].dtype == np.int64 and h5["coords"].shape == (10, 2)
        assert h5.attrs["patch_size_level0"] == 128  # file-level copy for TRIDENT-style readers
    status = json.loads((tmp_path / "out" / "status" / "tiny_slide.json").read_text())
    assert status["status"] == "ok" and status["n_tiles"] == 10 and status["seconds"] >= 0
    assert (tmp_path / "out" / "qc" / "tiny_slide.png").stat().st_size > 0


def test_overlap_and_coarser_mpp_match_the_geometry(tiny_slide, tmp_path):
    tile_slide(tiny_slide.path, tmp_path / "a", target_mpp=0.5, patch_size=128, overlap=64, min_tissue=0.4)
    coords, _ = read_coords(tmp_path / "a" / "patches" / "tiny_slide.h5")
    expected = reference_coords(tiny_slide.size, tiny_slide.tissue_boxes, 128, 64, 0.4)
    assert len(expected) == 52  # 31 + 21: whole tiles plus the half-covered ones along each box edge
    np.testing.assert_array_equal(coords, expected)

    tile_slide(tiny_slide.path, tmp_path / "b", target_mpp=1.0, patch_size=64)
    coords, attrs = read_coords(tmp_path / "b" / "patches" / "tiny_slide.h5")
    assert len(coords) == 10 and attrs["patch_level"] == 1 and attrs["patch_size_level0"] == 128

    tile_slide(tiny_slide.path, tmp_path / "c", patch_size=64, magnification=10)
    assert read_coords(tmp_path / "c" / "patches" / "tiny_slide.h5")[1]["target_mpp"] == 1.0


def test_finished_outputs_are_skipped_overwritten_or_refused(tiny_slide, tmp_path):
    out = tmp_path / "out"
    paths = OutputPaths.for_slide(out, "tiny_slide")
    tile_slide(tiny_slide.path, out, patch_size=128)
    stamp = paths.coords.stat().st_mtime_ns
    assert tile_slide(tiny_slide.path, out, patch_size=128).status == "skipped"
    assert paths.coords.stat().st_mtime_ns == stamp
    with pytest.raises(
        UserError,
        match=r"tiny_slide.h5 was made with other settings: `patch_size=64` \(the tiles "
        r"there: 128\); its 10 tiles are kept: pass `overwrite=True`",
    ):
        tile_slide(tiny_slide.path, out, patch_size=64)
    with pytest.raises(UserError, match=r"settings: `min_saturation=0.02` \(the tiles there: default\); its"):
        tile_slide(tiny_slide.path, out, patch_size=128, tissue=TissueConfig(min_saturation=0.02))
    assert tile_slide(tiny_slide.path, out, patch_size=64, overwrite=True).n_tiles > 10


def test_a_run_killed_before_its_status_is_redone(tiny_slide, tmp_path):
    out = tmp_path / "out"
    paths = OutputPaths.for_slide(out, "tiny_slide")
    tile_slide(tiny_slide.path, out, patch_size=128)
    paths.status.unlink()  # killed after the coords were renamed, before the status was
    (paths.coords.parent / ".tiny_slide.abc.tmp.h5").write_bytes(b"half")  # and a temp file left over
    assert tile_slide(tiny_slide.path, out, patch_size=128).status == "ok"


def test_a_failed_slide_leaves_a_failed_status_and_no_outputs(tmp_path):
    corrupt = tmp_path / "broken.svs"
    corrupt.write_bytes(np.random.default_rng(0).bytes(4096))
    paths = OutputPaths.for_slide(tmp_path / "out", "broken")
    paths.coords.parent.mkdir(parents=True)
    paths.coords.write_bytes(b"stale output of an earlier run")
    with pytest.raises(UserError, match="broken.svs"):
        tile_slide(corrupt, tmp_path / "out", overwrite=True)
    assert not paths.coords.exists() and not paths.qc.exists()
    status = json.loads(paths.status.read_text())
    assert status["status"] == "failed" and "broken.svs" in status["message"]


def test_missing_mpp_needs_an_override(tmp_path, tiny_slide):
    image = make_tissue_image(*tiny_slide.size, tiny_slide.tissue_boxes)
    path = write_pyramid_tiff(tmp_path / "nompp.tif", image, mpp=None, tile=128)
    with pytest.raises(UserError, match="nompp.tif: .*`mpp_override=X`"):
        tile_slide(path, tmp_path / "out", patch_size=128)
    assert tile_slide(path, tmp_path / "out", patch_size=128, mpp_override=0.5, overwrite=True).n_tiles == 10


@pytest.mark.parametrize(
    "kwargs, parameter",
    [
        (dict(overlap=128), "`overlap=128`: must be in"),
        (dict(min_tissue=1.5), "`min_tissue=1.5`: must be in"),
        (dict(patch_size=0), "`patch_size=0`: must be positive"),
    ],
)
def test_bad_settings_name_their_parameter(tiny_slide, tmp_path, kwargs, parameter):
    with pytest.raises(ConfigError, match=parameter):
        tile_slide(tiny_slide.path, tmp_path, **{"patch_size": 128, **kwargs})


@pytest.mark.samples
def test_sample_slide_tiles_at_20x(sample_file, tmp_path):
    result = tile_slide(sample_file("cmu_small_region"), tmp_path, magnification=20, patch_size=256)
    coords, attrs = read_coords(tmp_path / "patches" / "cmu_small_region.h5")
    assert attrs["target_mpp"] == pytest.approx(0.499)  # 20x objective, 0.499 mpp: 20x is level 0 as is
    assert attrs["patch_level"] == 0 and attrs["patch_size_level0"] == 256
    assert 15 <= result.n_tiles <= 60  # the skin strip covers roughly a third of the 8 x 11 grid
