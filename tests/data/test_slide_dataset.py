"""Tile datasets: lazy reads equal to the slide's pixels, workers, concatenation, moved slides."""

from __future__ import annotations

import pickle
import shutil

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from histodistill.data.slide_dataset import SlideTileDataset, SlideTilesDataset
from histodistill.errors import UserError
from histodistill.wsi.slide import open_slide
from histodistill.wsi.tiling import tile_slide


@pytest.fixture
def tiled(tiny_slide, tmp_path):
    """Tiling output of the tiny slide at 1.0 mpp, 64 px tiles (read from level 1)."""
    out = tmp_path / "tiles"
    tile_slide(tiny_slide.path, out, target_mpp=1.0, patch_size=64)
    return out / "patches"


def test_items_are_the_slides_pixels_at_the_coords_resolution(tiny_slide, tiled):
    dataset = SlideTileDataset(tiled / "tiny_slide.h5")
    assert len(dataset) == 10
    image, coords = dataset[3]
    assert image.shape == (3, 64, 64) and image.dtype == torch.uint8
    assert coords.dtype == torch.long and coords.tolist() == dataset.coords[3].tolist()
    expected = open_slide(tiny_slide.path).read_region(tuple(dataset.coords[3]), 1, (64, 64))
    np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), expected)


def test_transform_is_applied(tiled):
    dataset = SlideTileDataset(tiled / "tiny_slide.h5", transform=lambda x: x.float() / 255)
    image, _ = dataset[0]
    assert image.dtype == torch.float32 and image.min() >= 0 and image.max() <= 1


def test_tiles_dataset_transform_can_be_set_after_construction(tiled):
    # PatchDataModule assigns `.transform` in setup(); it must reach every slide's part.
    dataset = SlideTilesDataset(tiled)
    dataset.transform = lambda x: x.float() / 255
    assert dataset[len(dataset) - 1][0].dtype == torch.float32
    assert all(part.transform is dataset.transform for part in dataset.datasets)


def test_pickles_without_handles_and_workers_agree(tiled):
    dataset = SlideTileDataset(tiled / "tiny_slide.h5")
    dataset[0]  # opens the slide in this process; the dataset itself must still not carry the handle
    assert len(pickle.dumps(dataset)) < 10_000
    serial = list(DataLoader(dataset, batch_size=4, num_workers=0))
    parallel = list(DataLoader(dataset, batch_size=4, num_workers=2))
    assert len(serial) == len(parallel) == 3
    for (a, ca), (b, cb) in zip(serial, parallel, strict=True):
        assert torch.equal(a, b) and torch.equal(ca, cb)


def test_mpp_of_the_tiling_is_reused(tiny_slide, tmp_path):
    """A slide tiled with --mpp-override is read back at that mpp, not its metadata's."""
    tile_slide(tiny_slide.path, tmp_path, target_mpp=0.5, patch_size=64, mpp_override=0.25)
    dataset = SlideTileDataset(tmp_path / "patches" / "tiny_slide.h5")
    assert dataset.mpp == 0.25
    image, coords = dataset[0]
    # 0.5 mpp = level 1
    expected = open_slide(tiny_slide.path).read_region(tuple(coords.tolist()), 1, (64, 64))
    np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), expected)


def test_tiles_dataset_concatenates_slides_and_finds_moved_ones(tiny_slide, tiled, tmp_path):
    second = tmp_path / "second.tif"
    shutil.copy(tiny_slide.path, second)
    tile_slide(second, tiled.parent, target_mpp=1.0, patch_size=64)
    (tiled / ".second.x.tmp.h5").write_bytes(b"unfinished")  # a tile run still writing
    dataset = SlideTilesDataset(tiled)
    assert len(dataset) == 20
    assert [d.slide_id for d in dataset.datasets] == ["second", "tiny_slide"]
    assert dataset.slide_index(9) == 0 and dataset.slide_index(10) == 1
    image, _ = dataset[15]
    assert image.shape == (3, 64, 64)

    moved = tmp_path / "moved" / "second.tif"
    moved.parent.mkdir()
    second.rename(moved)
    with pytest.raises(UserError, match=r"second.h5: its slide .*second.tif does not exist.*slide_paths"):
        SlideTilesDataset(tiled)
    dataset = SlideTilesDataset(tiled, slide_paths={"second": moved})
    assert dataset.datasets[0].slide_path == moved and dataset[0][0].shape == (3, 64, 64)


def test_empty_patches_dir_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no coords files"):
        SlideTilesDataset(tmp_path)


@pytest.mark.parametrize("workers", [0, 1])
def test_a_corrupt_tile_is_replaced_by_the_next_readable_one_with_one_warning(tmp_path, capfd, workers):
    # Issue 29: training raised UnreadableRegion inside a DataLoader worker, re-wrapped by torch into a
    # traceback.
    from conftest import write_corrupt_slide
    from histodistill.data import slide_dataset

    slide_dataset._NAMED.discard("corrupt")  # a fresh process's state (workers=0 reads in this one)
    path, (x, y) = write_corrupt_slide(tmp_path / "corrupt.tif")
    tile_slide(path, tmp_path / "tiles", target_mpp=0.5, patch_size=128)
    dataset = SlideTilesDataset(tmp_path / "tiles" / "patches")
    coords = torch.cat([c for _, c in DataLoader(dataset, batch_size=16, num_workers=workers)]).tolist()
    damaged = [[x, y], [x + 128, y], [x, y + 128], [x + 128, y + 128]]
    # the batch keeps its size, no made-up pixels
    assert len(coords) == 64 and not any(c in damaged for c in coords)
    assert coords.count([x + 256, y]) == 3  # (x, y) and (x + 128, y) take the next readable tile of their row
    warnings = [line for line in capfd.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == [
        f"warning: slide corrupt: a tile at level-0 ({x}, {y}) cannot be read from {path} (Corrupt "
        "JPEG data: premature end of data segment); training uses the slide's next readable tile in "
        "its place and names no further ones of this slide (`histodistill extract` lists them all in "
        "unreadable_tiles.csv)"
    ]


def test_a_slide_with_no_readable_tile_is_a_user_error(tmp_path):
    from histodistill.data.slide_dataset import next_readable
    from histodistill.wsi.slide import UnreadableRegion

    def unreadable(index):
        raise UnreadableRegion(tmp_path / "s.tif", (0, 0), 0, (8, 8), "Corrupt JPEG data")

    with pytest.raises(UserError, match="slide s: none of its 3 tiles can be read .*restore the file"):
        next_readable(unreadable, 0, 3, "s", "tile")
