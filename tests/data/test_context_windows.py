"""Context windows: the right tiles in every cell, the tissue threshold at borders, one read per window."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from histodistill.data.context_windows import (
    ContextWindowDataset,
    context_windows_of_dir,
    grid_geometry,
    window_cells,
    window_transform,
)
from histodistill.errors import UserError
from histodistill.models.backbones import Preprocess
from histodistill.wsi.coords import read_coords, write_coords
from histodistill.wsi.slide import Slide, open_slide
from histodistill.wsi.tiling import grid_coords

TILE = 64


def box_tiles(x0: int, y0: int, cols: int, rows: int) -> np.ndarray:
    """(rows*cols, 2) top-lefts of a block of abutting 64-px tiles, row-major."""
    ys, xs = np.meshgrid(y0 + TILE * np.arange(rows), x0 + TILE * np.arange(cols), indexing="ij")
    return np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.int64)


def coords_attrs(slide_path, mpp=0.5, target_mpp=0.5, overlap=0) -> dict:
    return dict(
        patch_size=TILE,
        patch_level=0,
        patch_size_level0=round(TILE * target_mpp / mpp),
        mpp=mpp,
        target_mpp=target_mpp,
        overlap=overlap,
        slide_path=str(slide_path),
        slide_id="tiny_slide",
    )


@pytest.fixture
def tiled(tiny_slide, tmp_path):
    """The first tissue box of the tiny slide as a 6 x 4 block of 64-px tiles at the slide's own 0.5 mpp."""
    coords = box_tiles(128, 128, cols=6, rows=4)
    path = tmp_path / "patches" / "tiny_slide.h5"
    write_coords(path, coords, coords_attrs(tiny_slide.path))
    return path, coords


def test_cells_are_exactly_the_neighbouring_tiles(tiled):
    _, coords = tiled
    anchors, cells, valid = window_cells(coords, stride=TILE, cell_steps=1, side=3)
    assert len(anchors) == (6 - 2) * (4 - 2)  # only interior tiles have all 8 neighbours
    assert valid.all()
    for anchor, window in zip(anchors, cells, strict=True):
        x, y = coords[anchor]
        expected = [(x + TILE * dx, y + TILE * dy) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]  # row-major
        assert [tuple(c) for c in window.tolist()] == expected


@pytest.mark.parametrize(("min_fraction", "windows"), [(1.0, 8), (6 / 9, 20), (4 / 9, 24)])
def test_border_windows_follow_the_tissue_threshold(tiled, min_fraction, windows):
    _, coords = tiled
    anchors, cells, valid = window_cells(coords, TILE, 1, side=3, min_fraction=min_fraction)
    assert len(anchors) == windows  # 8 interior, 12 edge tiles (6/9 cells), 4 corners (4/9)
    tiles = {tuple(c) for c in coords.tolist()}
    for window, flags in zip(cells, valid, strict=True):
        assert flags.tolist() == [tuple(c) in tiles for c in window.tolist()]
        assert flags.mean() >= min_fraction - 1e-6


def test_even_side_anchors_the_upper_left_central_cell(tiled):
    _, coords = tiled
    anchors, cells, _ = window_cells(coords, TILE, 1, side=2)
    assert (cells[:, 0] == coords[anchors]).all()  # anchor at cell (0, 0) = (s-1)//2 for s = 2


def test_cells_land_on_tiles_when_the_scale_is_not_an_integer():
    # 0.499 mpp slide tiled at 0.5 mpp: stride 64.128 level-0 px, tiles at round(k * stride).
    attrs = coords_attrs("unused", mpp=0.499, target_mpp=0.5)
    coords = grid_coords((1000, 700), TILE, 0, 0.5 / 0.499)
    stride, steps = grid_geometry(attrs, "coords.h5")
    _, _, valid = window_cells(coords, stride, steps, side=3)
    assert valid.all() and len(valid) == (len(np.unique(coords[:, 0])) - 2) * (
        len(np.unique(coords[:, 1])) - 2
    )


def test_overlap_that_does_not_divide_the_tile_is_refused():
    with pytest.raises(UserError, match="`overlap=0`"):
        grid_geometry(coords_attrs("s", overlap=24), "coords.h5")
    # half overlap: every 2nd tile
    assert grid_geometry(coords_attrs("s", overlap=32), "coords.h5") == (
        32.0,
        2,
    )


def test_one_read_per_window_and_cells_match_the_tiles(tiled, monkeypatch):
    path, _ = tiled
    reads = []
    original = Slide.read_at_mpp

    def spy(self, location, size_px, target_mpp):
        reads.append((tuple(location), size_px))
        return original(self, location, size_px, target_mpp)

    monkeypatch.setattr(Slide, "read_at_mpp", spy)
    dataset = ContextWindowDataset(path, side=3)
    window, cells, valid, teacher = dataset[3]
    assert reads == [(tuple(cells[0].tolist()), 3 * TILE)]  # one region read, from the top-left cell
    assert window.shape == (3, 3 * TILE, 3 * TILE) and window.dtype == torch.uint8
    assert cells.shape == (9, 2) and valid.shape == (9,) and teacher.shape == (9, 0)
    slide = open_slide(dataset.slide_path)
    for k in (0, 4, 8):
        i, j = divmod(k, 3)
        alone = original(slide, tuple(cells[k].tolist()), TILE, 0.5)  # (64, 64, 3)
        np.testing.assert_array_equal(
            window[:, i * TILE : (i + 1) * TILE, j * TILE : (j + 1) * TILE].permute(1, 2, 0).numpy(), alone
        )


def test_items_carry_teacher_features_of_their_cells(tiled, tmp_path):
    path, coords = tiled
    features_dir = tmp_path / "features_teacher"
    features_dir.mkdir()
    # (N, 3)
    features = np.concatenate([coords, coords.sum(axis=1, keepdims=True)], axis=1).astype(np.float32)
    with h5py.File(features_dir / "tiny_slide.h5", "w") as h5:
        h5["features"], h5["coords"] = features, coords
    dataset = context_windows_of_dir(path.parent, features_dir, side=3, min_fraction=4 / 9)
    _, cells, valid, teacher = dataset[0]  # a corner window: 4 tissue cells of 9
    assert valid.sum() == 4
    np.testing.assert_array_equal(teacher[valid][:, :2].numpy(), cells[valid].numpy())
    assert (teacher[~valid] == 0).all()


def test_no_window_meets_the_threshold_is_a_user_error(tiny_slide, tmp_path):
    path = tmp_path / "patches" / "tiny_slide.h5"
    write_coords(path, box_tiles(128, 128, cols=2, rows=2), coords_attrs(tiny_slide.path))
    with pytest.raises(UserError, match="min_fraction"):
        context_windows_of_dir(path.parent, None, side=3)


def test_window_transform_resizes_each_cell_to_the_model_input_and_normalises():
    transform = window_transform(Preprocess(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), input_size=32), side=3)
    out = transform(torch.full((3, 3 * TILE, 3 * TILE), 255, dtype=torch.uint8))
    assert out.shape == (3, 96, 96)
    torch.testing.assert_close(out, torch.ones(3, 96, 96))


def test_windows_are_read_at_the_tilings_mpp_not_the_slides_metadata(tmp_path):
    # A plain PNG has no mpp in its metadata: as after `tile --mpp-override 0.25`, only the coords file knows
    # it.
    from PIL import Image

    from conftest import make_tissue_image

    png = tmp_path / "no_mpp.png"
    Image.fromarray(make_tissue_image(512, 512, ((0, 0, 512, 512),))).save(png)
    path = tmp_path / "patches" / "no_mpp.h5"
    write_coords(path, box_tiles(0, 0, cols=3, rows=3) * 2, coords_attrs(png, mpp=0.25, target_mpp=0.5))
    dataset = ContextWindowDataset(path, side=3)
    window, cells, _, _ = dataset[0]
    assert dataset.mpp == 0.25
    # a 2x downsampled read
    expected = open_slide(png, 0.25).read_at_mpp(tuple(cells[0].tolist()), 3 * TILE, 0.5)
    np.testing.assert_array_equal(window.permute(1, 2, 0).numpy(), expected)


@pytest.mark.parametrize(("window_stride", "most_visits"), [(1, 9), (3, 1)])
def test_window_stride_sets_how_often_one_epoch_shows_a_tile(tiled, window_stride, most_visits):
    _, coords = tiled
    anchors, cells, valid = window_cells(
        coords, TILE, 1, side=3, min_fraction=1 / 9, window_stride=window_stride
    )
    visits: dict[tuple[int, int], int] = {}
    for window, flags in zip(cells, valid, strict=True):
        for cell in window[flags].tolist():
            visits[tuple(cell)] = visits.get(tuple(cell), 0) + 1
    # stride 1: an interior tile is a target in all 9 of its windows
    assert max(visits.values()) == most_visits
    assert ((np.round(coords[anchors] / TILE) % window_stride) == 0).all()


def test_excluded_slides_give_no_window(tiled, tiny_slide):
    path, _ = tiled
    kept = context_windows_of_dir(path.parent, None, side=3, min_fraction=0.5)
    # excluded by its slide id
    write_coords(
        path.parent / "other.h5",
        box_tiles(128, 128, cols=6, rows=4),
        coords_attrs(tiny_slide.path) | {"slide_id": "other"},
    )
    both = context_windows_of_dir(path.parent, None, side=3, min_fraction=0.5)
    held_out = context_windows_of_dir(path.parent, None, side=3, min_fraction=0.5, exclude=["other"])
    assert len(both) == 2 * len(kept) and len(held_out) == len(kept) > 0


def test_a_corrupt_window_is_replaced_by_the_slides_next_readable_one_with_one_warning(tmp_path, capfd):
    # Issue 29: MCM-KD training raised UnreadableRegion inside a DataLoader worker (a traceback).
    from torch.utils.data import DataLoader

    from conftest import write_corrupt_slide
    from histodistill.data import slide_dataset
    from histodistill.wsi.tiling import tile_slide

    slide_dataset._NAMED.discard("corrupt")
    path, (x, y) = write_corrupt_slide(tmp_path / "corrupt.tif")
    tile_slide(path, tmp_path / "tiles", target_mpp=0.5, patch_size=128)
    dataset = context_windows_of_dir(tmp_path / "tiles" / "patches", None, side=3, window_stride=3)
    corners = torch.cat([cells[:, 0] for _, cells, _, _ in DataLoader(dataset, batch_size=4, num_workers=1)])
    # anchors on cells 3 and 6 of the 8 x 8 grid: corners at 256, 640 px
    assert len(corners) == len(dataset) == 4
    # The window over the damaged JPEG tile (256..512 px) is (256, 256)'s: it takes the next one, (640, 256).
    assert sorted(map(tuple, corners.tolist())) == [(256, 640), (640, 256), (640, 256), (640, 640)]
    warnings = [line for line in capfd.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and warnings[0].startswith(
        f"warning: slide corrupt: a context window at level-0 ({x}, {y}) cannot be read from {path} (Corrupt "
        "JPEG"
    )


# ---- CLAM's and TRIDENT's coords: no mpp, windows by level-0 geometry ---------------------------------
HALF = TILE // 2  # their tiles: 32 px at half the slide's resolution, i.e. 64 level-0 px


def layout_attrs(layout: str) -> dict:
    """The attrs CLAM's create_patches_fp / TRIDENT write for 32-px tiles of 64 level-0 px (no slide path, no
    mpp)."""
    if layout == "clam":
        return dict(
            patch_size=HALF,
            patch_level=1,
            downsample=np.array([2.0, 2.0]),
            downsampled_level_dim=np.array([512, 384]),
            level_dim=np.array([1024, 768]),
            name="tiny_slide",
            save_path="patches",
        )
    return dict(
        patch_size=HALF,
        patch_size_level0=TILE,
        level0_magnification=20,
        target_magnification=10,
        overlap=0,
        name="tiny_slide",
        savetodir="job",
    )


@pytest.mark.parametrize("layout", ["clam", "trident"])
def test_clam_and_trident_coords_give_exactly_the_windows_of_ours(tiny_slide, tmp_path, layout):
    coords = box_tiles(128, 128, cols=6, rows=4)
    ours = tmp_path / "ours" / "patches" / "tiny_slide.h5"
    write_coords(
        ours,
        coords,
        coords_attrs(tiny_slide.path, target_mpp=1.0) | {"patch_size": HALF, "patch_size_level0": TILE},
    )
    name = "tiny_slide_patches.h5" if layout == "trident" else "tiny_slide.h5"  # TRIDENT's file name
    theirs = tmp_path / layout / "patches" / name
    write_coords(theirs, coords, layout_attrs(layout))
    features = tmp_path / "features"
    features.mkdir()
    with h5py.File(features / "tiny_slide.h5", "w") as h5:  # the teacher cache names files by slide id
        h5["features"], h5["coords"] = coords.astype(np.float32), coords
    expected = context_windows_of_dir(ours.parent, features, side=3, min_fraction=4 / 9)
    with pytest.raises(UserError, match="`slides_dir=DIR`"):  # their coords name no slide
        context_windows_of_dir(theirs.parent, features, side=3, min_fraction=4 / 9)
    got = context_windows_of_dir(
        theirs.parent, features, side=3, min_fraction=4 / 9, slides_dir=tiny_slide.path.parent
    )
    assert grid_geometry(read_coords(theirs)[1], theirs) == (float(TILE), 1)
    ours_part, their_part = expected.datasets[0], got.datasets[0]
    assert their_part.target_mpp is None and their_part.window_level0 == 3 * TILE
    np.testing.assert_array_equal(their_part.anchors, ours_part.anchors)
    np.testing.assert_array_equal(their_part.cell_coords, ours_part.cell_coords)
    np.testing.assert_array_equal(their_part.valid, ours_part.valid)
    assert len(got) == len(expected) == 24
    for index in (0, 5, 23):  # a corner, an edge and the last window: pixels, cells, flags and teacher rows
        for mine, other in zip(got[index], expected[index], strict=True):
            assert torch.equal(mine, other)
    assert got[0][0].shape == (3, 3 * HALF, 3 * HALF)


def test_a_clam_grid_per_contour_with_a_fractional_step_finds_its_neighbours():
    # CLAM starts each contour's grid at the contour's corner and steps by patch_size * downsample (here
    # 64.4 level-0 px), truncated to int; patch_size_level0 is 64 after rounding.
    steps = (37 + np.arange(5) * 64.4).astype(np.int64)
    ys, xs = np.meshgrid(steps, steps, indexing="ij")
    coords = np.stack([xs.ravel(), ys.ravel()], axis=1)  # (25, 2)
    attrs = dict(patch_size=HALF, patch_size_level0=64, overlap=0)
    stride, cell_steps = grid_geometry(attrs, "clam.h5")
    anchors, cells, valid = window_cells(coords, stride, cell_steps, side=3, on_grid=False)
    assert len(anchors) == 9 and valid.all()  # the 3 x 3 interior tiles, every neighbour found
    index = {tuple(xy): k for k, xy in enumerate(coords.tolist())}
    for anchor, window in zip(anchors, cells, strict=True):
        row, col = divmod(int(anchor), 5)
        neighbours = [
            index[(int(steps[col + dx]), int(steps[row + dy]))] for dy in (-1, 0, 1) for dx in (-1, 0, 1)
        ]
        np.testing.assert_array_equal(window, coords[neighbours])  # the tiles' own coords, row-major


def test_trident_overlap_spaces_cells_by_whole_tiles():
    attrs = dict(patch_size=HALF, patch_size_level0=TILE, overlap=HALF // 2)
    assert grid_geometry(attrs, "trident.h5") == (TILE / 2, 2)  # grid step 32 level-0 px, cells 2 steps apart
