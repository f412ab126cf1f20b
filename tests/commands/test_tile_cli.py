"""`histodistill tile` end to end: inputs (file, folder, CSV), parallel runs, skips, bad inputs."""

from __future__ import annotations

import argparse
import shutil

import numpy as np
import pytest
import tifffile
from PIL import Image

from conftest import make_tissue_image
from histodistill.cli import main
from histodistill.commands import tile as tile_command
from histodistill.wsi.coords import read_coords
from histodistill.wsi.tiff_writer import write_pyramid_tiff


def test_every_option_has_help():
    parser = argparse.ArgumentParser()
    tile_command.add_arguments(parser)
    assert all(action.help for action in parser._actions)


def test_single_slide_then_skip_then_overwrite(tiny_slide, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["tile", str(tiny_slide.path), "--out", str(out), "--patch-size", "128"]
    assert main(argv) == 0
    assert "1 tiled, 0 already done, 0 failed, 0 with no tiles; 10 tiles" in capsys.readouterr().out
    assert main(argv) == 0
    assert "0 tiled, 1 already done" in capsys.readouterr().out
    assert main([*argv, "--overwrite"]) == 0
    assert "1 tiled" in capsys.readouterr().out
    # other settings over finished outputs: refused (a user error), outputs kept
    assert main([*argv[:-1], "64"]) == 2
    err = capsys.readouterr().err
    # Issue 29: only the setting that differs (not the whole settings dict), the tiles kept, and the fix.
    assert err.splitlines() == [
        f"error: {out / 'patches'}: 1 of 1 slides were tiled there with other settings "
        "(--patch-size 64 (the tiles there: 128)); their 10 tiles are kept: pass --overwrite "
        "to tile them again with these settings, or choose another --out"
    ]
    assert '"status": "ok"' in (out / "status" / "tiny_slide.json").read_text()
    assert len(read_coords(out / "patches" / "tiny_slide.h5")[0]) == 10


@pytest.mark.slow
def test_folder_in_parallel_equals_serial(tiny_slide, tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    for name in ("a.tif", "b.tif", "c.tif"):
        shutil.copy(tiny_slide.path, slides / name)
    (slides / "notes.txt").write_text("not a slide")
    base = ["tile", str(slides), "--patch-size", "128"]
    assert main([*base, "--out", str(tmp_path / "serial")]) == 0
    assert main([*base, "--out", str(tmp_path / "parallel"), "--workers", "2"]) == 0
    for name in ("a", "b", "c"):
        serial, _ = read_coords(tmp_path / "serial" / "patches" / f"{name}.h5")
        parallel, _ = read_coords(tmp_path / "parallel" / "patches" / f"{name}.h5")
        np.testing.assert_array_equal(serial, parallel)
    assert sorted(p.name for p in (tmp_path / "parallel" / "qc").iterdir()) == ["a.png", "b.png", "c.png"]


def test_csv_with_per_slide_mpp(tmp_path):
    image = make_tissue_image(512, 512, [(0, 0, 256, 256)])
    write_pyramid_tiff(tmp_path / "nompp.tif", image, mpp=None, tile=128)
    Image.fromarray(image).save(tmp_path / "photo.png")
    (tmp_path / "slides.csv").write_text("path,mpp\nnompp.tif,0.5\nphoto.png,0.25\n")
    assert (
        main(["tile", str(tmp_path / "slides.csv"), "--out", str(tmp_path / "out"), "--patch-size", "128"])
        == 0
    )
    assert len(read_coords(tmp_path / "out" / "patches" / "nompp.h5")[0]) == 4
    coords, attrs = read_coords(tmp_path / "out" / "patches" / "photo.h5")  # 128 px at 0.5 = 256 px at 0.25
    assert attrs["mpp"] == 0.25 and attrs["patch_size_level0"] == 256 and coords.tolist() == [[0, 0]]


def write_bad_inputs(folder):
    """One file per way a slide can be unusable; returns their names."""
    folder.mkdir()
    (folder / "random.svs").write_bytes(np.random.default_rng(0).bytes(4096))
    tifffile.imwrite(folder / "deep.tif", np.full((64, 64, 3), 4000, np.uint16))
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(folder / "nompp.png", dpi=(96, 96))
    return ["random.svs", "deep.tif", "nompp.png"]


def test_bad_slides_fail_by_name_and_the_others_go_on(tiny_slide, tmp_path, capsys):
    slides = tmp_path / "slides"
    names = write_bad_inputs(slides)
    shutil.copy(tiny_slide.path, slides / "good.tif")
    out = tmp_path / "out"
    assert main(["tile", str(slides), "--out", str(out), "--patch-size", "128", "--workers", "2"]) == 1
    captured = capsys.readouterr()
    assert "1 tiled, 0 already done, 3 failed" in captured.out
    for name in names:
        assert f"failed: {slides / name}:" in captured.err
        assert '"status": "failed"' in (out / "status" / f"{name.split('.')[0]}.json").read_text()
    assert sorted(p.name for p in (out / "patches").iterdir()) == ["good.h5"]
    assert sorted(p.name for p in (out / "qc").iterdir()) == ["good.png"]


@pytest.mark.parametrize("index", [0, 1, 2])
def test_each_bad_slide_alone_exits_non_zero(tmp_path, capsys, index):
    name = write_bad_inputs(tmp_path / "slides")[index]
    assert main(["tile", str(tmp_path / "slides" / name), "--out", str(tmp_path / "out")]) != 0
    assert name in capsys.readouterr().err
    assert not (tmp_path / "out" / "patches").exists() or not any((tmp_path / "out" / "patches").iterdir())


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: None, "no such slide, folder or CSV"),
        (lambda p: p.mkdir(), "no slide files in this folder"),
        (
            lambda p: p.write_text("file\nx.svs\n"),
            "lacks column(s) ['path'] (read as comma-separated with header ['file'])",
        ),
        (lambda p: p.write_text("path,mpp\nx.svs,fast\n"), "line 2: `mpp` must be a number"),
    ],
)
def test_bad_sources_are_user_errors(tmp_path, capsys, setup, message):
    source = tmp_path / "input.csv"
    setup(source)
    assert main(["tile", str(source), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "input.csv" in err and message in err


def test_duplicate_slide_ids_are_refused(tiny_slide, tmp_path, capsys):
    for folder in ("x", "y"):
        (tmp_path / folder).mkdir()
        shutil.copy(tiny_slide.path, tmp_path / folder / "s.tif")
    (tmp_path / "slides.csv").write_text("path\nx/s.tif\ny/s.tif\n")
    assert main(["tile", str(tmp_path / "slides.csv"), "--out", str(tmp_path / "out")]) == 2
    assert "two slides share the id 's'" in capsys.readouterr().err


def test_mpp_and_magnification_are_exclusive(tiny_slide, tmp_path):
    with pytest.raises(SystemExit):
        main(["tile", str(tiny_slide.path), "--out", str(tmp_path), "--mpp", "0.5", "--magnification", "20"])


def test_a_non_positive_mask_resolution_is_a_user_error(tiny_slide, tmp_path, capsys):
    assert main(["tile", str(tiny_slide.path), "--out", str(tmp_path / "out"), "--mask-mpp", "0"]) == 2
    assert "--mask-mpp must be positive" in capsys.readouterr().err
