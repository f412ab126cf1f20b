"""Heatmaps: tile boxes land where the tiles are, end to end through `histodistill heatmap`."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from PIL import Image

from histodistill.cli import main
from histodistill.eval.heatmap import infer_patch_size_level0, overlay, rank_scale, score_raster


def grid_coords(xs, ys, step):
    return np.array([(x * step, y * step) for y in ys for x in xs], np.int64)


def test_brightest_box_is_the_high_attention_tile():
    step, downsample = 128, 8.0  # level-0 tile size, level-0 px per thumbnail px
    coords = grid_coords(range(1, 7), range(1, 5), step)
    scores = np.random.default_rng(0).uniform(0, 0.1, len(coords))
    hot = 9
    scores[hot] = 1.0
    thumbnail = np.full((96, 128, 3), 200, np.uint8)
    raster = score_raster(thumbnail.shape[:2], coords, rank_scale(scores), step, downsample)
    image = overlay(thumbnail, raster, "inferno", 0.7, 0.0, 1.0)
    brightness = image.astype(float).sum(axis=2)
    ys, xs = np.nonzero(brightness == brightness.max())
    x0, y0 = coords[hot] / downsample
    assert xs.min() == x0 and ys.min() == y0
    assert xs.max() == x0 + step / downsample - 1 and ys.max() == y0 + step / downsample - 1
    # Outside every tile the thumbnail is untouched.
    assert np.isnan(raster[0, 0]) and (image[0, 0] == 200).all()


def test_rank_scale_and_patch_size_inference():
    assert rank_scale(np.array([0.5, 0.1, 0.9])).tolist() == [0.5, 0.0, 1.0]
    assert infer_patch_size_level0(grid_coords(range(3), range(2), 224)) == 224


@pytest.fixture
def mil_run(tmp_path, tiny_slide):
    """A run directory with attention for the tiny slide: one tile in its tissue scored far above the rest."""
    coords = grid_coords(range(1, 4), range(1, 3), 128)  # inside the first tissue box (128..512, 128..384)
    scores = np.full(len(coords), 0.01, np.float32)
    scores[4] = 0.95  # the tile at (256, 256)
    run = tmp_path / "run"
    (run / "attention").mkdir(parents=True)
    with h5py.File(run / "attention" / f"{tiny_slide.path.stem}.h5", "w") as handle:
        handle["coords"], handle["scores"] = coords, scores
        handle.attrs.update(patch_size=128, target_mpp=0.5, fold=0, label=1)
    return run, coords[4]


def test_heatmap_command_writes_screen_sized_pngs(mil_run, tiny_slide):
    run, _ = mil_run
    assert main(["heatmap", "--run", str(run), "--slides", str(tiny_slide.path.parent), "--top-k", "2"]) == 0
    out = run / "figures" / "heatmaps"
    for name in ("heatmap", "tiles"):
        with Image.open(out / f"{tiny_slide.path.stem}_{name}.png") as png:
            assert png.width <= 1600


def test_heatmap_montage_shows_the_top_tile_first(mil_run, tiny_slide, monkeypatch):
    run, hot = mil_run
    from histodistill.eval import heatmap

    drawn = {}
    monkeypatch.setattr(heatmap, "draw_montage", lambda path, top, bottom, *a, **k: drawn.update(top=top))
    heatmap.slide_heatmap(
        tiny_slide.path, run / "attention" / f"{tiny_slide.path.stem}.h5", run / "out", top_k=1, tile_px=128
    )
    from histodistill.wsi.slide import open_slide

    expected = open_slide(tiny_slide.path).read_region(tuple(hot), 0, (128, 128))
    np.testing.assert_array_equal(drawn["top"][0], expected)


def test_unknown_run_directory_is_a_user_error(tmp_path, capsys):
    assert main(["heatmap", "--run", str(tmp_path), "--slides", str(tmp_path)]) == 2
    assert "histodistill mil" in capsys.readouterr().err


def test_a_corrupt_tile_is_drawn_grey_with_one_warning(tmp_path, capsys, monkeypatch):
    # Issue 29: the thumbnail of a slide with a corrupt JPEG tile (level 0 only) stopped with an
    # OpenSlideError.
    from conftest import write_corrupt_slide
    from histodistill.eval import heatmap

    path, (x, y) = write_corrupt_slide(tmp_path / "corrupt.tif", levels=False)
    coords = grid_coords(range(4), range(4), 256)  # the damaged tile (256, 256) is one of them
    (tmp_path / "attention").mkdir()
    with h5py.File(tmp_path / "attention" / "corrupt.h5", "w") as handle:
        handle["coords"], handle["scores"] = (
            coords,
            np.linspace(0, 1, len(coords)).astype(np.float32)[::-1].copy(),
        )
        handle.attrs.update(patch_size_level0=256)
    drawn = {}
    monkeypatch.setattr(
        heatmap, "draw_heatmap", lambda path, thumbnail, *a, **k: drawn.update(thumbnail=thumbnail)
    )
    monkeypatch.setattr(heatmap, "draw_montage", lambda path, top, bottom, *a, **k: drawn.update(top=top))
    heatmap.slide_heatmap(
        path, tmp_path / "attention" / "corrupt.h5", tmp_path / "out", top_k=8, thumbnail_size=256
    )
    thumbnail = drawn["thumbnail"]  # 1024 px slide at 256 px: the damaged 256-px tile is 64 x 64 px
    assert thumbnail.shape == (256, 256, 3)
    assert (thumbnail[64:128, 64:128] == heatmap.MISSING).all() and thumbnail[:64, :64].mean() < 240
    # The montage's 6th highest tile is the damaged one (scores fall with the index): grey, the others tissue.
    assert (drawn["top"][5] == heatmap.MISSING).all() and drawn["top"][0].mean() < 240
    [warning] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warning.startswith(
        f"warning: slide corrupt: 1 region(s) of {path} cannot be read (corrupt or damaged; "
        f"first: level-0 ({x}, {y}): Corrupt JPEG data"
    )
    assert warning.endswith("drawn grey (missing) in corrupt_heatmap.png and corrupt_tiles.png")
