"""`extract --coords` on CLAM's and TRIDENT's own outputs, `--slides` for slides they do not name or that
moved, the tiling carried onto features files, and heatmap boxes that follow it after --mpp-override."""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest

from histodistill.cli import main
from histodistill.eval import heatmap
from histodistill.wsi.coords import read_coords
from histodistill.wsi.tiff_writer import write_pyramid_tiff
from histodistill.wsi.tiling import tile_slide

MODEL = "tiny/resnet18-64"
# in the tiny slide's tissue
SAME_TILES = np.array([[128, 128], [256, 128], [128, 256], [384, 256]], np.int64)


def extract(coords, out, *extra) -> int:
    return main(
        [
            "extract",
            "--model",
            MODEL,
            "--random-init",
            "--coords",
            str(coords),
            "--out",
            str(out),
            "--workers",
            "0",
            "--batch-size",
            "4",
            *extra,
        ]
    )


def features_of(out, slide_id="tiny_slide"):
    with h5py.File(out / "features_tiny-resnet18-64-random-init" / f"{slide_id}.h5", "r") as h5:
        return h5["features"][:], h5["coords"][:], dict(h5["coords"].attrs)


def ours(tiny_slide, tmp_path, target_mpp, patch_size):
    """Our features of SAME_TILES at this resolution, as the reference for another tool's coords."""
    tile_slide(tiny_slide.path, tmp_path / "ours", target_mpp=target_mpp, patch_size=patch_size)
    coords_path = tmp_path / "ours" / "patches" / "tiny_slide.h5"
    _, attrs = read_coords(coords_path)
    with h5py.File(coords_path, "w") as h5:  # keep only the four tiles the other tool "found"
        h5["coords"] = SAME_TILES
        h5["coords"].attrs.update(attrs)
    assert extract(tmp_path / "ours", tmp_path / "ours_features") == 0
    return features_of(tmp_path / "ours_features")


def test_clam_patches_folder_with_slides_dir(tiny_slide, tmp_path, capsys):
    patches = tmp_path / "clam" / "patches"
    patches.mkdir(parents=True)
    with h5py.File(patches / "tiny_slide.h5", "w") as h5:  # as create_patches_fp writes it: no slide path
        h5["coords"] = SAME_TILES
        h5["coords"].attrs.update(
            patch_size=128,
            patch_level=0,
            downsample=np.array([1.0, 1.0]),
            downsampled_level_dim=np.array([1024, 768]),
            level_dim=np.array([1024, 768]),
            name="tiny_slide",
            save_path=str(patches),
        )
    assert extract(patches, tmp_path / "features") == 2  # no slide path and no --slides: one error line
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1 and err[0].startswith("error:") and "tiny_slide.h5" in err[0] and "--slides" in err[0]
    )
    assert (
        extract(
            patches, tmp_path / "features", "--slides", str(tiny_slide.path.parent), "--slide-ext", ".tif"
        )
        == 0
    )
    features, coords, attrs = features_of(tmp_path / "features")
    np.testing.assert_array_equal(coords, SAME_TILES)
    assert attrs["patch_size_level0"] == 128 and attrs["patch_size"] == 128
    reference, _, _ = ours(tiny_slide, tmp_path, target_mpp=0.5, patch_size=128)
    np.testing.assert_allclose(features, reference, rtol=1e-5, atol=1e-6)
    # In context too: the same windows, read by their level-0 size, as from our coords of the same tiles.
    assert (
        extract(patches, tmp_path / "ctx", "--slides", str(tiny_slide.path.parent), "--context-window", "3")
        == 0
    )
    assert extract(tmp_path / "ours", tmp_path / "ours_ctx", "--context-window", "3") == 0
    with (
        h5py.File(
            tmp_path / "ctx" / "features_tiny-resnet18-64-random-init-context3" / "tiny_slide.h5", "r"
        ) as h5,
        h5py.File(
            tmp_path / "ours_ctx" / "features_tiny-resnet18-64-random-init-context3" / "tiny_slide.h5", "r"
        ) as ref,
    ):
        np.testing.assert_array_equal(h5["coords"][:], SAME_TILES)
        np.testing.assert_allclose(h5["features"][:], ref["features"][:], rtol=1e-5, atol=1e-6)


def test_trident_output_folder_with_slides_dir(tiny_slide, tmp_path):
    patches = tmp_path / "trident" / "patches"
    patches.mkdir(parents=True)
    with h5py.File(patches / "tiny_slide_patches.h5", "w") as h5:
        h5["coords"] = SAME_TILES
        h5["coords"].attrs.update(
            patch_size=64,
            patch_size_level0=128,
            level0_magnification=20,
            target_magnification=10,
            overlap=0,
            name="tiny_slide",
            savetodir=str(tmp_path),
        )
    assert extract(tmp_path / "trident", tmp_path / "features", "--slides", str(tiny_slide.path.parent)) == 0
    features, _, attrs = features_of(tmp_path / "features")
    assert attrs["patch_size_level0"] == 128 and attrs["target_magnification"] == 10
    reference, _, _ = ours(tiny_slide, tmp_path, target_mpp=1.0, patch_size=64)  # 10x = 1.0 mpp
    np.testing.assert_allclose(features, reference, rtol=1e-5, atol=1e-6)


def test_slides_that_moved_are_found_with_slides(tiny_slide, tmp_path, capsys):
    slide = shutil.copy(tiny_slide.path, tmp_path / "moving.tif")
    tile_slide(slide, tmp_path / "tiles", patch_size=128)
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    shutil.move(slide, moved / "moving.tif")
    assert extract(tmp_path / "tiles", tmp_path / "features") == 2
    assert "moving.tif no longer exists; pass --slides DIR" in capsys.readouterr().err
    assert extract(tmp_path / "tiles", tmp_path / "features", "--slides", str(moved)) == 0


def test_features_file_carries_the_tiling(tiny_slide, tmp_path):
    tile_slide(tiny_slide.path, tmp_path / "tiles", target_mpp=1.0, patch_size=64)
    assert extract(tmp_path / "tiles", tmp_path / "features") == 0
    _, _, attrs = features_of(tmp_path / "features")
    expected = {
        "patch_size_level0": 128,
        "patch_size": 64,
        "target_mpp": 1.0,
        "mpp": 0.5,
        "level0_magnification": 20.0,
        "target_magnification": 10.0,
    }
    assert {key: attrs[key] for key in expected} == pytest.approx(expected)
    assert next(iter(attrs)) == "patch_size_level0"


def test_heatmap_boxes_follow_the_tiling_after_mpp_override(tmp_path, monkeypatch, capsys):
    # Tagged 0.25 mpp but really 0.5: tiled with --mpp-override 0.5 --patch-size 128, the boxes are 128 px.
    from conftest import make_tissue_image

    slide = write_pyramid_tiff(
        tmp_path / "mistagged.tif", make_tissue_image(768, 512, [(0, 0, 768, 512)]), mpp=0.25
    )
    assert (
        main(
            [
                "tile",
                str(slide),
                "--out",
                str(tmp_path / "tiles"),
                "--mpp-override",
                "0.5",
                "--patch-size",
                "128",
            ]
        )
        == 0
    )
    assert extract(tmp_path / "tiles", tmp_path / "features") == 0
    # The attention file as `mil` writes it: coords, scores, the features file's attributes.
    with h5py.File(
        tmp_path / "features" / "features_tiny-resnet18-64-random-init" / "mistagged.h5", "r"
    ) as source:
        attrs = dict(source.attrs) | dict(source["coords"].attrs)
        coords = source["coords"][:]
    (tmp_path / "run" / "attention").mkdir(parents=True)
    with h5py.File(tmp_path / "run" / "attention" / "mistagged.h5", "w") as out:
        out["coords"], out["scores"] = coords, np.linspace(0, 1, len(coords), dtype=np.float32)
        out.attrs.update({k: v for k, v in attrs.items() if np.isscalar(v)})
    sizes = []
    original = heatmap.score_raster
    monkeypatch.setattr(heatmap, "score_raster", lambda *a: sizes.append(a[3]) or original(*a))
    # slide found by its slide_path
    assert main(["heatmap", "--run", str(tmp_path / "run"), "--top-k", "1"]) == 0
    assert sizes == [128]
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.move(slide, moved / "mistagged.tif")
    assert main(["heatmap", "--run", str(tmp_path / "run"), "--top-k", "1"]) == 2
    assert "mistagged.tif no longer exists; pass --slides DIR" in capsys.readouterr().err
    assert (
        main(
            [
                "heatmap",
                "--run",
                str(tmp_path / "run"),
                "--top-k",
                "1",
                "--slides",
                str(moved),
                "--slide-ext",
                ".tif",
            ]
        )
        == 0
    )
    assert sizes == [128, 128]
