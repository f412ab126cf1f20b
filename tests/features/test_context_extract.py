"""`extract --context-window`: each tile's feature is the centre cell of its window, aligned, resumable,
separate."""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from histodistill.cli import main
from histodistill.data.slide_dataset import SlideTileDataset
from histodistill.data.transforms import build_transform
from histodistill.errors import UserError
from histodistill.features.context_extract import CentreCell, CentreCellTiles, centre_cell_extraction
from histodistill.features.extract import extract_slide
from histodistill.models.backbones import Backbone, BackboneSpec, Preprocess, create_backbone
from histodistill.wsi.coords import read_coords, write_coords
from histodistill.wsi.tiling import tile_slide

MODEL, TILE = "tiny/resnet18-64", 64
FOLDER = "features_tiny-resnet18-64-random-init-context3"


def tiling(tiny_slide, tmp_path, names):
    """A tiling output of the tiny slide copied under each name, at 1.0 mpp in 64-px tiles (10 per slide)."""
    out = tmp_path / "tiles"
    for name in names:
        copy = shutil.copy(tiny_slide.path, tmp_path / f"{name}.tif")
        tile_slide(copy, out, target_mpp=1.0, patch_size=TILE)
    return out


@pytest.fixture
def tiles(tiny_slide, tmp_path):
    return tiling(tiny_slide, tmp_path, ("slide_a", "slide_b"))


@pytest.fixture
def one_slide(tiny_slide, tmp_path):
    return tiling(tiny_slide, tmp_path, ("slide_a",))


def _extract(tiles, out, *extra):
    return main(
        [
            "extract",
            "--model",
            MODEL,
            "--random-init",
            "--coords",
            str(tiles),
            "--out",
            str(out),
            "--workers",
            "0",
            "--batch-size",
            "8",
            *extra,
        ]
    )


class PixelNet(nn.Module):
    """1x1 convolutions only: each output pixel depends on its own input pixel, so the mean over a cell
    of a window's map equals the mean over the map of that cell alone."""

    num_features = 5

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 7, 1), nn.ReLU(), nn.Conv2d(7, 5, 1))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, 5, H, W)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x.mean(dim=(2, 3))  # (B, 5)


def pixel_backbone() -> Backbone:
    torch.manual_seed(0)
    preprocess = Preprocess(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), input_size=TILE, mpp=0.5)
    return Backbone(PixelNet(), BackboneSpec("pixelnet", "pixelnet", {}, preprocess, "test")).eval()


def corner_coords(tiny_slide, tmp_path):
    """Tiles in the slide's top-left and bottom-right corners, whose windows reach beyond the slide."""
    width, height = tiny_slide.size
    coords = np.array([[0, 0], [TILE, 0], [width - TILE, height - TILE]], np.int64)
    path = tmp_path / "patches" / "tiny_slide.h5"
    attrs = dict(
        patch_size=TILE,
        patch_level=0,
        patch_size_level0=TILE,
        mpp=0.5,
        target_mpp=0.5,
        overlap=0,
        slide_path=str(tiny_slide.path),
        slide_id="tiny_slide",
    )
    write_coords(path, coords, attrs)
    return path, coords


def test_features_folder_holds_centre_cell_features_apart_from_per_patch_ones(one_slide, tmp_path):
    out = tmp_path / "features"
    assert _extract(one_slide, out) == 0  # per-patch features first, in the same --out
    per_patch = out / "features_tiny-resnet18-64-random-init"
    stamp = (per_patch / "slide_a.h5").stat().st_mtime_ns
    assert _extract(one_slide, out, "--context-window", "3") == 0
    folder = out / FOLDER
    assert sorted(p.name for p in folder.iterdir()) == ["extractor.json", "slide_a.h5"]
    assert json.loads((folder / "extractor.json").read_text())["context_window"] == 3
    assert json.loads((per_patch / "extractor.json").read_text())["context_window"] is None
    assert (per_patch / "slide_a.h5").stat().st_mtime_ns == stamp  # untouched, not taken as done either

    coords_path = one_slide / "patches" / "slide_a.h5"
    expected_coords, _ = read_coords(coords_path)
    with h5py.File(folder / "slide_a.h5") as handle:
        features, coords = handle["features"][:], handle["coords"][:]
        assert handle.attrs["context_window"] == 3 and handle.attrs["patch_size"] == TILE
    assert features.dtype == np.float32 and features.shape == (len(expected_coords), 512)
    assert coords.dtype == np.int64 and np.array_equal(coords, expected_coords)
    assert not np.allclose(features, h5py.File(per_patch / "slide_a.h5")["features"][:], atol=1e-3)

    torch.manual_seed(0)  # extraction builds randomly initialised names with seed 0
    model, tiles_of = centre_cell_extraction(create_backbone(MODEL, pretrained=False).eval(), 3)
    window, tile_xy = tiles_of(coords_path)[len(expected_coords) - 1]
    assert window.shape == (3, 3 * 64, 3 * 64)  # every cell at the model's 64-px input size
    assert tile_xy.tolist() == [*expected_coords[-1].tolist(), 1]  # (x, y, readable): extract leaves out 0s
    with torch.no_grad():
        np.testing.assert_allclose(features[-1], model(window[None])[0].numpy(), rtol=1e-4, atol=1e-5)


def test_centre_cell_of_a_pixelwise_network_equals_the_tiles_own_feature(tiny_slide, tmp_path):
    # Tiles read at the wrong place or mpp, or the wrong cell kept, would break this equality.
    coords = np.stack(np.meshgrid(np.arange(128, 512, TILE), np.arange(128, 384, TILE)), -1).reshape(-1, 2)
    path = tmp_path / "patches" / "tiny_slide.h5"
    write_coords(
        path,
        coords,
        dict(
            patch_size=TILE,
            patch_level=0,
            patch_size_level0=TILE,
            mpp=0.5,
            target_mpp=0.5,
            overlap=0,
            slide_path=str(tiny_slide.path),
            slide_id="tiny_slide",
        ),
    )
    backbone = pixel_backbone()
    model, tiles_of = centre_cell_extraction(backbone, 3)
    windows = tiles_of(path)
    per_tile = SlideTileDataset(
        path, transform=build_transform("eval", backbone.spec.preprocess, train=False)
    )
    with torch.no_grad():
        context = model(torch.stack([windows[i][0] for i in range(len(windows))]))  # (N, 5)
        own = backbone(torch.stack([per_tile[i][0] for i in range(len(per_tile))]))  # (N, 5)
    torch.testing.assert_close(context, own, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(context[1:], context[:-1])  # tiles differ, so a shifted cell would be caught


def test_border_tiles_get_windows_with_the_white_beyond_the_slide(tiny_slide, tmp_path):
    path, coords = corner_coords(tiny_slide, tmp_path)
    raw = CentreCellTiles(path, transform=None, side=3)
    assert len(raw) == len(coords)
    window, xy = raw[0]  # top-left tile: the top row and left column of its window lie outside the slide
    assert xy.tolist() == [0, 0]
    assert (window[:, :TILE, :] == 255).all() and (window[:, :, :TILE] == 255).all()
    last, _ = raw[2]  # bottom-right tile: the bottom row and right column are outside
    assert (last[:, -TILE:, :] == 255).all() and (last[:, :, -TILE:] == 255).all()
    torch.manual_seed(0)
    model, tiles_of = centre_cell_extraction(create_backbone(MODEL, pretrained=False).eval(), 3)
    features, xy, _ = extract_slide(model, tiles_of(path), batch_size=4)
    assert features.shape == (3, 512) and np.isfinite(features).all()
    assert np.array_equal(xy, coords)


def test_rerun_skips_finished_slides_and_redoes_missing_ones(tiles, tmp_path):
    out = tmp_path / "features"
    assert _extract(tiles, out, "--context-window", "3") == 0
    folder = out / FOLDER
    stamp_a = (folder / "slide_a.h5").stat().st_mtime_ns
    before = h5py.File(folder / "slide_b.h5")["features"][:]
    (folder / "slide_b.h5").unlink()
    assert _extract(tiles, out, "--context-window", "3") == 0
    assert (folder / "slide_a.h5").stat().st_mtime_ns == stamp_a  # finished slide skipped
    # redone identically
    np.testing.assert_array_equal(h5py.File(folder / "slide_b.h5")["features"][:], before)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--context-window", "2"], "odd number"),
        (["--context-window", "3", "--model", "tiny/vit-tiny-p8-64"], "dynamic_img_size"),
    ],
)
def test_unusable_windows_are_refused_before_anything_is_written(one_slide, tmp_path, capsys, extra, message):
    assert _extract(one_slide, tmp_path / "f", *extra) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "f").exists()


def test_image_folders_have_no_context(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    assert (
        main(
            [
                "extract",
                "--model",
                MODEL,
                "--random-init",
                "--images",
                str(tmp_path / "images"),
                "--out",
                str(tmp_path),
                "--context-window",
                "3",
            ]
        )
        == 2
    )
    assert "--coords" in capsys.readouterr().err


def test_tiles_off_the_tiling_grid_are_refused(tiny_slide, tmp_path):
    path, coords = corner_coords(tiny_slide, tmp_path)
    write_coords(path, coords + 5, read_coords(path)[1])  # e.g. a CLAM tiling anchored elsewhere
    with pytest.raises(UserError, match="not on the grid"):
        CentreCellTiles(path, transform=None, side=3)


def test_centre_cell_is_the_middle_of_the_pooled_grid():
    backbone = pixel_backbone()
    window = torch.zeros(1, 3, 3 * TILE, 3 * TILE)
    window[:, :, TILE : 2 * TILE, TILE : 2 * TILE] = 1.0  # only the centre cell is bright
    with torch.no_grad():
        centre = CentreCell(backbone, 3)(window)
        expected = backbone(torch.ones(1, 3, TILE, TILE))
    torch.testing.assert_close(centre, expected, rtol=1e-4, atol=1e-4)  # sums in another order
