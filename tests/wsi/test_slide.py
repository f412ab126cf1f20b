"""Slide backends: dimensions, mpp rules, level choice, reads (in and out of bounds), bad inputs."""

from __future__ import annotations

import numpy as np
import openslide
import pytest
import tifffile
from PIL import Image

from histodistill.errors import UserError
from histodistill.wsi import slide as slide_module
from histodistill.wsi.slide import ImageSlide, OpenSlideLikeSlide, open_slide
from histodistill.wsi.tiff_writer import write_pyramid_tiff


@pytest.fixture
def lossless_slide(tmp_path):
    """(path, image): a 512 x 384 deflate-compressed pyramid at 0.25 mpp, so reads can be compared exactly."""
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (384, 512, 3), dtype=np.uint8)
    path = write_pyramid_tiff(tmp_path / "lossless.tif", image, mpp=0.25, tile=128, compression="zlib")
    return path, image


def test_openslide_backend_reports_levels_and_mpp(tiny_slide):
    slide = open_slide(tiny_slide.path)
    assert isinstance(slide, OpenSlideLikeSlide)
    assert slide.slide_id == "tiny_slide"
    assert slide.dimensions == (1024, 768)
    assert slide.level_dimensions == [(1024, 768), (512, 384), (256, 192), (128, 96)]
    assert slide.level_downsamples == [1.0, 2.0, 4.0, 8.0]
    assert slide.mpp == pytest.approx(0.5)
    assert slide.objective_power is None


def test_read_region_is_exact_and_white_outside(lossless_slide):
    path, image = lossless_slide
    slide = open_slide(path)
    region = slide.read_region((100, 50), 0, (64, 32))
    assert region.shape == (32, 64, 3) and region.dtype == np.uint8
    np.testing.assert_array_equal(region, image[50:82, 100:164])
    # Half outside the right edge: the inside part is the image, the rest white glass.
    edge = slide.read_region((480, 0), 0, (64, 16))
    np.testing.assert_array_equal(edge[:, :32], image[:16, 480:])
    assert (edge[:, 32:] == 255).all()
    assert (slide.read_region((-40, -40), 1, (10, 10)) == 255).all()


def test_best_level_for_mpp(lossless_slide):
    slide = open_slide(lossless_slide[0])  # levels at 0.25, 0.5, 1.0 mpp
    assert slide.level_count == 3
    assert [slide.best_level_for_mpp(m) for m in (0.1, 0.25, 0.4, 0.5, 0.9, 1.0, 5.0)] == [
        0,
        0,
        0,
        1,
        1,
        2,
        2,
    ]
    assert slide.best_level_for_mpp(0.4998) == 1  # scanner rounding in the downsample is tolerated
    assert slide.best_level_for_mpp(0.49) == 0


def test_read_at_mpp_reads_the_best_level_then_resizes(lossless_slide):
    path, _ = lossless_slide
    slide = open_slide(path)
    # 0.5 mpp exists as level 1: the tile is that level's pixels, no resize.
    np.testing.assert_array_equal(
        slide.read_at_mpp((64, 32), 40, 0.5), slide.read_region((64, 32), 1, (40, 40))
    )
    # 0.75 mpp: 60 px read at level 1 (0.5 mpp), resized to 40.
    tile = slide.read_at_mpp((64, 32), 40, 0.75)
    expected = Image.fromarray(slide.read_region((64, 32), 1, (60, 60))).resize(
        (40, 40), Image.Resampling.BILINEAR
    )
    np.testing.assert_array_equal(tile, np.asarray(expected))


def test_tiffslide_backend_is_the_fallback(lossless_slide, monkeypatch):
    path, image = lossless_slide

    def refuse(_path):
        raise openslide.OpenSlideUnsupportedFormatError("unsupported")

    monkeypatch.setattr(openslide, "OpenSlide", refuse)
    slide = slide_module._open_uncached(path.resolve(), None)
    assert type(slide._handle).__module__.startswith("tiffslide")
    assert slide.level_dimensions == [(512, 384), (256, 192), (128, 96)]
    assert slide.mpp == pytest.approx(0.25)
    np.testing.assert_array_equal(slide.read_region((8, 8), 0, (16, 16)), image[8:24, 8:24])
    assert (slide.read_region((500, 380), 0, (20, 20))[4:, :] == 255).all()  # white, not tiffslide's black


def test_open_slide_is_cached_per_path_and_override(tiny_slide):
    assert open_slide(tiny_slide.path) is open_slide(str(tiny_slide.path))
    overridden = open_slide(tiny_slide.path, mpp=0.25)
    assert overridden is not open_slide(tiny_slide.path)
    assert overridden.mpp == 0.25


def test_thumbnail_keeps_aspect(tiny_slide):
    thumb = open_slide(tiny_slide.path).get_thumbnail(256)
    assert thumb.shape == (192, 256, 3) and thumb.dtype == np.uint8


def test_plain_images_are_converted_to_rgb(tmp_path):
    rgba = np.zeros((8, 10, 4), np.uint8)
    rgba[..., :3] = (200, 100, 50)
    rgba[:, :5, 3] = 255  # left half opaque, right half fully transparent
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    region = open_slide(tmp_path / "rgba.png").read_region((0, 0), 0, (10, 8))
    assert (region[:, :5] == (200, 100, 50)).all() and (region[:, 5:] == 255).all()

    gray = np.arange(80, dtype=np.uint8).reshape(8, 10)
    Image.fromarray(gray).save(tmp_path / "gray.png")
    slide = open_slide(tmp_path / "gray.png")
    assert isinstance(slide, ImageSlide) and slide.level_count == 1
    np.testing.assert_array_equal(
        slide.read_region((0, 0), 0, (10, 8)), np.repeat(gray[..., None], 3, axis=2)
    )

    Image.fromarray(gray).convert("P").save(tmp_path / "palette.png")
    np.testing.assert_array_equal(
        open_slide(tmp_path / "palette.png").read_region((0, 0), 0, (10, 8))[..., 0], gray
    )


@pytest.mark.parametrize(
    "name, pixels, tiled",
    [
        ("rgb16.tif", np.full((64, 64, 3), 4000, np.uint16), False),
        ("tiled16.tif", np.full((256, 256, 3), 4000, np.uint16), True),
        ("gray16.png", np.full((16, 16), 4000, np.uint16), False),
    ],
)
def test_16_bit_images_are_refused_by_name(tmp_path, name, pixels, tiled):
    path = tmp_path / name
    if name.endswith(".png"):
        Image.fromarray(pixels).save(path)
    else:
        tifffile.imwrite(path, pixels, tile=(128, 128) if tiled else None)
    with pytest.raises(UserError, match=rf"{name}: 16-bit samples .* convert the file to 8-bit"):
        open_slide(path)


def test_corrupt_and_missing_files_name_the_file(tmp_path):
    corrupt = tmp_path / "corrupt.svs"
    corrupt.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(UserError, match="corrupt.svs: not a readable slide or image"):
        open_slide(corrupt)
    with pytest.raises(UserError, match="missing.svs: slide file not found"):
        open_slide(tmp_path / "missing.svs")


def test_plain_image_mpp_is_read_from_its_tag_and_refused_outside_microscope_range(tmp_path):
    pixels = np.zeros((8, 8, 3), np.uint8)
    Image.fromarray(pixels).save(tmp_path / "screen.png", dpi=(96, 96))  # an editor default
    Image.fromarray(pixels).save(tmp_path / "scan.jpg", dpi=(50800, 50800))  # 0.5 um/px
    tifffile.imwrite(tmp_path / "cm.tif", pixels, resolution=(40000, 40000), resolutionunit="CENTIMETER")
    Image.fromarray(pixels).save(tmp_path / "none.png")
    assert open_slide(tmp_path / "scan.jpg").mpp == pytest.approx(0.5)
    assert open_slide(tmp_path / "cm.tif").mpp == pytest.approx(0.25)
    with pytest.raises(UserError, match=r"none.png: the slide has no microns-per-pixel.*`mpp_override=X`"):
        _ = open_slide(tmp_path / "none.png").mpp
    # An editor default is refused by name, value and tag, not silently read as 264.6 um/px.
    with pytest.raises(
        UserError,
        match=r"screen.png: level-0 mpp 264.6 um/px read from its PNG pHYs chunk "
        r"\(96.* dpi\) is outside 0.05-16.0 .*`mpp_override=X`",
    ):
        _ = open_slide(tmp_path / "screen.png").mpp
    assert open_slide(tmp_path / "screen.png", mpp=0.3).mpp == 0.3


def test_unknown_mpp_of_a_pyramid_names_the_slide(tmp_path):
    path = write_pyramid_tiff(tmp_path / "nompp.tif", np.zeros((128, 128, 3), np.uint8), mpp=None, tile=64)
    with pytest.raises(UserError, match="nompp.tif: .*`mpp_override=X`"):
        _ = open_slide(path).mpp


def test_a_corrupt_jpeg_tile_is_an_error_naming_slide_and_region_and_the_slide_stays_readable(tmp_path):
    from conftest import write_corrupt_slide
    from histodistill.wsi.slide import UnreadableRegion

    path, (x, y) = write_corrupt_slide(tmp_path / "corrupt.tif")
    slide = open_slide(path)
    with pytest.raises(UnreadableRegion) as info:
        slide.read_region((x, y), 0, (256, 256))
    assert str(info.value).startswith(
        f"{path}: the 256 x 256 px region at level-0 ({x}, {y}), level 0, cannot be read (Corrupt JPEG data"
    )
    # OpenSlide keeps an error for good; the handle was opened again, so the other tiles still read.
    assert slide.read_region((0, 0), 0, (256, 256)).mean() < 250
    # A whole-level read loses only the damaged block (as glass) and lists it.
    image = slide.read_downsampled(1)
    assert (image[y : y + 256, x : x + 256] == 255).all() and image[:256, :256].mean() < 250
    assert [(d.location, d.level) for d in slide.unreadable] == [((x, y), 0)]
