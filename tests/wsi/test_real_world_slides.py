"""Issue 12's inputs: slides as they come, each with the right value asserted.

Tissue everywhere, pale beside strong tissue, navy ink, grayscale / blank / too small (never a silent
zero), nonsense resolution tags, upsampling, huge plain images.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import GLASS_RGB, make_tissue_image
from histodistill.cli import main
from histodistill.errors import UserError
from histodistill.wsi import slide as slide_module
from histodistill.wsi.coords import read_coords
from histodistill.wsi.slide import open_slide
from histodistill.wsi.tiff_writer import write_pyramid_tiff
from histodistill.wsi.tiling import tile_slide


def status_of(out, slide_id) -> dict:
    return json.loads((out / "status" / f"{slide_id}.json").read_text())


def test_pale_copy_beside_a_strong_copy_keeps_its_tiles(tmp_path):
    # A 384-px H&E patch on glass (236), once as is and once blended 50 % with the glass: 9 tiles each.
    strong = make_tissue_image(384, 384, [(0, 0, 384, 384)], seed=7).astype(np.float32)
    image = np.full((512, 1024, 3), 236, np.float32)
    image[128:512, 0:384] = strong
    image[128:512, 512:896] = 0.5 * strong + 0.5 * 236
    path = write_pyramid_tiff(tmp_path / "pale.tif", image.astype(np.uint8), mpp=0.5)
    tile_slide(path, tmp_path / "out", patch_size=128, target_mpp=0.5)
    coords, _ = read_coords(tmp_path / "out" / "patches" / "pale.h5")
    assert (coords[:, 0] < 512).sum() == 9
    assert (coords[:, 0] >= 512).sum() >= 8


def test_navy_ink_band_gives_no_tiles(tmp_path):
    rng = np.random.default_rng(0)
    image = np.clip(np.array(GLASS_RGB) + rng.normal(0, 3, (512, 1280, 3)), 0, 255)
    image[128:384, 128:1152] = np.array([69, 61, 119]) + rng.normal(0, 8, (256, 1024, 3))  # 8 tiles of ink
    path = write_pyramid_tiff(tmp_path / "ink.tif", np.clip(image, 0, 255).astype(np.uint8), mpp=0.5)
    result = tile_slide(path, tmp_path / "out", patch_size=128)
    assert result.n_tiles == 0


def test_an_image_that_is_tissue_everywhere_keeps_every_tile(tmp_path):
    # Loose pale stroma beside nuclei-dense tissue, no glass: Otsu over saturation would split them.
    rng = np.random.default_rng(2)
    image = np.empty((512, 512, 3), np.float32)
    image[:, :256] = np.array([238, 214, 226]) + rng.normal(0, 4, (512, 256, 3))
    image[:, 256:] = make_tissue_image(256, 512, [(0, 0, 256, 512)], seed=3)
    path = tmp_path / "roi.png"
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(path)
    assert tile_slide(path, tmp_path / "out", patch_size=128, mpp_override=0.5).n_tiles == 16


@pytest.mark.parametrize(
    ("name", "pixels", "reason", "parameter", "option"),
    [
        (
            "gray",
            make_tissue_image(512, 512, [(0, 0, 512, 512)]).mean(2, keepdims=True).repeat(3, 2),
            "the image has no colour",
            "`min_saturation=0`",
            "--min-saturation 0",
        ),
        (
            "blank",
            np.full((512, 512, 3), 240),
            "no tissue found",
            "`min_saturation=0.02`",
            "--min-saturation 0.02",
        ),
        (
            "small",
            make_tissue_image(100, 100, [(0, 0, 100, 100)]),
            "smaller than one 256-px tile",
            "`patch_size=...`",
            "lower --patch-size or --mpp",
        ),
    ],
)
def test_zero_tiles_are_never_silent(tmp_path, capsys, name, pixels, reason, parameter, option):
    path = write_pyramid_tiff(tmp_path / f"{name}.tif", pixels.astype(np.uint8), mpp=0.5, tile=64)
    out = tmp_path / "out"
    assert main(["tile", str(path), "--out", str(out)]) == 0
    status = status_of(out, name)
    assert status["status"] == "empty" and status["n_tiles"] == 0
    # the file speaks Python, the CLI flags
    assert reason in status["message"] and parameter in status["message"]
    assert str(out / "qc" / f"{name}.png") in status["message"] and (out / "qc" / f"{name}.png").is_file()
    assert not (out / "patches" / f"{name}.h5").exists()
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and reason in warnings[0] and option in warnings[0]
    assert "1 with no tiles" in captured.out
    assert main(["tile", str(path), "--out", str(out)]) == 0  # skipped on a rerun, still not silent
    captured = capsys.readouterr()
    assert "1 already done" in captured.out and "1 with no tiles" in captured.out and reason in captured.err


@pytest.mark.parametrize(("dpi", "mpp"), [(72, "352.8"), (300, "84.67")])
def test_a_desktop_resolution_tag_is_refused_by_name_and_writes_no_coords(tmp_path, capsys, dpi, mpp):
    image = make_tissue_image(512, 512, [(0, 0, 512, 512)])
    path = write_pyramid_tiff(tmp_path / "tagged.tif", image, mpp=25400 / dpi, tile=128)
    out = tmp_path / "out"
    # One slide named on the command line is bad input (exit 2); in a folder it is one failed slide (exit 1).
    assert main(["tile", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"tagged.tif: level-0 mpp {mpp} um/px read from its `openslide.mpp-x` property" in err
    assert "pass --mpp-override X with the scanner's resolution" in err
    assert not (out / "patches" / "tagged.h5").exists()
    assert status_of(out, "tagged")["status"] == "failed"
    # the named remedy works
    assert main(["tile", str(path), "--out", str(out), "--mpp-override", "0.5"]) == 0


def test_an_mpp_override_off_by_ten_is_refused_too(tiny_slide, tmp_path):
    with pytest.raises(
        UserError, match=r"level-0 mpp 0.025 um/px read from the override \(`mpp_override=...`, or"
    ):
        tile_slide(tiny_slide.path, tmp_path / "out", mpp_override=0.025)


def test_patch_size_level0_is_never_below_one(tiny_slide, tmp_path):
    with pytest.raises(
        UserError, match=r"a 1-px tile at 0.05 mpp is 0.00313 level-0 pixels.*raise `patch_size=...`"
    ):
        tile_slide(tiny_slide.path, tmp_path / "out", target_mpp=0.05, patch_size=1, mpp_override=16)


def test_upsampling_is_a_warning_that_names_both_mpps(tiny_slide, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["tile", str(tiny_slide.path), "--out", str(out), "--mpp", "0.25"]) == 0
    message = status_of(out, "tiny_slide")["message"]
    assert (
        "target 0.25 mpp is finer than the slide's level 0 (0.5 mpp" in message and "upsampled 2x" in message
    )
    assert status_of(out, "tiny_slide")["status"] == "ok"
    # the CLI names its option
    assert message.replace("`target_mpp=0.5`", "--mpp 0.5") in capsys.readouterr().err


def test_images_beyond_pillows_pixel_limit_are_read_when_memory_allows(tmp_path, monkeypatch):
    image = make_tissue_image(300, 200, [(0, 0, 300, 200)])
    Image.fromarray(image).save(tmp_path / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 60000 px is 60x the limit: Pillow would refuse
    slide = open_slide(tmp_path / "huge.png")
    np.testing.assert_array_equal(slide.read_region((0, 0), 0, (300, 200)), image)
    assert Image.MAX_IMAGE_PIXELS == 1000  # the limit is lifted for our read only
    monkeypatch.setattr(slide_module, "available_memory", lambda: 10_000)
    with pytest.raises(
        UserError,
        match=r"huge.png: the image is 300 x 200 px .*beyond Pillow's pixel limit.*"
        r"tiled pyramidal TIFF.*vips tiffsave",
    ):
        slide_module._open_uncached(tmp_path / "huge.png", None)


def test_detection_reads_the_pyramid_level_closest_to_the_mask_resolution(tmp_path, monkeypatch):
    # 0.5 mpp with levels 1/2/4/8/16: a 256-px tile at 0.5 mpp wants an 8 um/px mask = downsample 16.
    image = make_tissue_image(2048, 2048, [(256, 256, 1792, 1792)])
    path = write_pyramid_tiff(tmp_path / "pyramid.tif", image, mpp=0.5)
    slide = open_slide(path)
    levels = []
    original = type(slide).read_region
    monkeypatch.setattr(
        type(slide),
        "read_region",
        lambda self, loc, level, size: levels.append(level) or original(self, loc, level, size),
    )
    tile_slide(path, tmp_path / "out")
    assert slide.level_downsamples[levels[0]] == 16
    assert max(slide.level_dimensions[levels[0]]) == 128


@pytest.mark.samples
def test_sample_image_that_is_tissue_everywhere_keeps_21_of_25_tiles(sample_file, tmp_path):
    # hgsc_stromal_he.jpg at --mpp-override 0.5, 256-px tiles: every tile is > 80 % tissue.
    result = tile_slide(sample_file("hgsc_stromal_he"), tmp_path / "out", mpp_override=0.5)
    assert result.n_tiles >= 21


@pytest.mark.samples
def test_sample_svs_crop_pale_beside_strong(sample_file, tmp_path):
    crop = (
        open_slide(sample_file("cmu_small_region")).read_region((768, 1920), 0, (768, 768)).astype(np.float32)
    )
    canvas = np.full((1280, 2304, 3), 236, np.float32)
    canvas[256:1024, 256:1024] = crop
    canvas[256:1024, 1280:2048] = 0.5 * crop + 0.5 * 236
    path = write_pyramid_tiff(tmp_path / "pale.tif", canvas.astype(np.uint8), mpp=0.5)
    tile_slide(path, tmp_path / "out")
    coords, _ = read_coords(tmp_path / "out" / "patches" / "pale.h5")
    assert (coords[:, 0] < 1152).sum() == 9 and (coords[:, 0] >= 1152).sum() >= 8


def test_a_corrupt_jpeg_tile_is_a_warning_not_a_failed_slide(tmp_path, capsys):
    # Issue 29: `tile` stopped (exit 2) naming the file with no fix. Now the damaged block is taken as glass
    # for tissue detection, the slide is tiled, and one warning names the region and what extract will do.
    from conftest import write_corrupt_slide

    path, (x, y) = write_corrupt_slide(tmp_path / "corrupt.tif", levels=False)
    assert main(["tile", str(path), "--out", str(tmp_path / "out"), "--patch-size", "128"]) == 0
    err = capsys.readouterr().err
    assert err.splitlines() == [
        f"warning: {path}: 1 region(s) of the slide file cannot be read (first: level-0 ({x}, {y}), level 0: "
        "Corrupt JPEG data: premature end of data segment); they were taken as glass for tissue detection, "
        "and `extract` leaves out, names and records the tiles it cannot read"
    ]
    assert status_of(tmp_path / "out", "corrupt")["status"] == "ok"
