"""Faults while extracting (issue 29). A full disk during `extract`, `tile` and `fit`: exit 2 and one `error:`
line naming the file that could not be written, the space the run needs and that a rerun resumes; finished
files stay valid and the rerun completes them (the full disk is a write that raises ENOSPC at a chosen file:
no root, no
tmpfs). A corrupt JPEG tile: left out, named and recorded, the run goes on."""

from __future__ import annotations

import errno
import shutil

import h5py
import numpy as np
import pytest

from histodistill.cli import main
from histodistill.errors import UserError
from histodistill.features import extract
from histodistill.io import DiskFullError, atomic_path, reporting_full_disk
from histodistill.wsi.tiling import tile_slide

FOLDER = "features_tiny-resnet18-64-random-init"


def full_disk_at(name: str, real):
    """``real`` (a writer whose first argument is the output path), but ENOSPC half-way through ``name``."""

    def write(path, *args, **kwargs):
        if path.name != name:
            return real(path, *args, **kwargs)
        with atomic_path(path) as tmp:
            tmp.write_bytes(b"half a file")
            raise OSError(errno.ENOSPC, "No space left on device")

    return write


@pytest.fixture
def tiles(tiny_slide, tmp_path):
    out = tmp_path / "tiles"
    for name in ("slide_a", "slide_b", "slide_c"):
        tile_slide(shutil.copy(tiny_slide.path, tmp_path / f"{name}.tif"), out, target_mpp=1.0, patch_size=64)
    return out


def _extract(tiles, out):
    return main(
        [
            "extract",
            "--model",
            "tiny/resnet18-64",
            "--random-init",
            "--coords",
            str(tiles),
            "--out",
            str(out),
            "--workers",
            "0",
            "--batch-size",
            "8",
        ]
    )


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "error: " in line]


def test_extract_on_a_full_disk_is_one_line_and_the_rerun_resumes(tiles, tmp_path, capsys, monkeypatch):
    out = tmp_path / "features"
    monkeypatch.setattr(
        extract, "write_slide_features", full_disk_at("slide_b.h5", extract.write_slide_features)
    )
    assert _extract(tiles, out) == 2
    err = capsys.readouterr().err
    folder = out / FOLDER
    [line] = error_lines(err)
    assert "Traceback" not in err
    assert line.startswith(f"error: no space left on the disk to write {folder / 'slide_b.h5'} (")
    assert "this run needs about" in line and f"in {folder} (" in line and "written so far" in line
    assert "run the same command again: it resumes, keeping every finished file" in line
    # Finished before the disk filled: valid; the failed one left nothing, not even its temporary file.
    assert sorted(p.name for p in folder.iterdir()) == ["extractor.json", "slide_a.h5"]
    with h5py.File(folder / "slide_a.h5") as handle:
        first = handle["features"][:]
    monkeypatch.undo()
    assert _extract(tiles, out) == 0
    assert sorted(p.name for p in folder.iterdir()) == [
        "extractor.json",
        "slide_a.h5",
        "slide_b.h5",
        "slide_c.h5",
    ]
    with h5py.File(folder / "slide_a.h5") as handle:
        np.testing.assert_array_equal(handle["features"][:], first)  # kept, not redone


def test_the_estimate_is_what_the_run_writes(tiles, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(
        extract, "write_slide_features", full_disk_at("slide_a.h5", extract.write_slide_features)
    )
    assert _extract(tiles, tmp_path / "features") == 2
    line = error_lines(capsys.readouterr().err)[0]
    monkeypatch.undo()
    assert _extract(tiles, tmp_path / "whole") == 0
    written = sum(p.stat().st_size for p in (tmp_path / "whole" / FOLDER).glob("*.h5"))
    estimate = float(line.split("needs about ")[1].split(" KB")[0]) * 1000
    assert 0.8 * written < estimate < 1.5 * written


def test_tile_on_a_full_disk_stops_with_one_line(tiny_slide, tmp_path, capsys, monkeypatch):
    from histodistill.wsi import tiling

    slides = tmp_path / "slides"
    slides.mkdir()
    for name in ("a", "b", "c"):
        shutil.copy(tiny_slide.path, slides / f"{name}.tif")
    monkeypatch.setattr(tiling, "write_coords", full_disk_at("b.h5", tiling.write_coords))
    assert main(["tile", str(slides), "--out", str(tmp_path / "out"), "--patch-size", "128"]) == 2
    err = capsys.readouterr().err
    [line] = error_lines(err)
    assert "Traceback" not in err and "failed:" not in err
    assert line.startswith(
        f"error: no space left on the disk to write {tmp_path / 'out' / 'patches' / 'b.h5'} ("
    )
    assert "this run needs about" in line and "it resumes" in line
    monkeypatch.undo()
    assert main(["tile", str(slides), "--out", str(tmp_path / "out"), "--patch-size", "128"]) == 0
    assert "2 tiled, 1 already done" in capsys.readouterr().out  # the run stopped at b: c was never begun


def test_a_library_error_that_says_write_failed_is_a_full_disk_too(tmp_path):
    # torch.save and HDF5 report a full disk as RuntimeError "... file write failed".
    with (
        pytest.raises(UserError, match=r"no space left on the disk to write .*last.ckpt .*it resumes"),
        reporting_full_disk(tmp_path, lambda: 3_000_000),
        atomic_path(tmp_path / "checkpoints" / "last.ckpt"),
    ):
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
    assert not list((tmp_path / "checkpoints").iterdir())
    with pytest.raises(DiskFullError) as info:  # a worker process's error comes back naming the same file
        import pickle

        raise pickle.loads(pickle.dumps(DiskFullError(tmp_path / "x.h5")))
    assert info.value.path == tmp_path / "x.h5"
    with (
        pytest.raises(RuntimeError, match="something else"),
        reporting_full_disk(tmp_path),
    ):  # others stay as they are
        raise RuntimeError("something else")


def test_corrupt_tiles_are_left_out_named_and_recorded_and_the_rerun_keeps_the_file(tmp_path, capsys):
    # Issue 29: `extract` ended in an OpenSlideError traceback naming neither the slide nor the tile.
    from conftest import write_corrupt_slide
    from histodistill.data.feature_files import UNREADABLE_ATTR, UNREADABLE_CSV

    path, (x, y) = write_corrupt_slide(tmp_path / "corrupt.tif")
    tile_slide(path, tmp_path / "tiles", target_mpp=0.5, patch_size=128)
    out, folder = tmp_path / "features", tmp_path / "features" / FOLDER
    assert _extract(tmp_path / "tiles", out) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: slide")]
    # the 256-px JPEG tile holds four tiles
    damaged = [
        (x, y),
        (x + 128, y),
        (x, y + 128),
        (x + 128, y + 128),
    ]
    assert warnings == [
        f"warning: slide corrupt: 4 of 64 tiles cannot be read from the slide file (corrupt or "
        f"damaged) and are left out of its features: {', '.join(map(str, damaged))}; listed in "
        f"{folder / UNREADABLE_CSV}"
    ]
    with h5py.File(folder / "corrupt.h5") as handle:
        assert handle["features"].shape == (60, 512) and handle.attrs[UNREADABLE_ATTR] == 4
        kept = {tuple(c) for c in handle["coords"][:].tolist()}
    assert kept.isdisjoint(damaged) and len(kept) == 60
    assert (folder / UNREADABLE_CSV).read_text().splitlines() == [
        "slide_id,x,y",
        *(f"corrupt,{a},{b}" for a, b in damaged),
    ]
    stamp = (folder / "corrupt.h5").stat().st_mtime_ns
    # a finished file with 60 of 64 rows is finished, not redone
    assert _extract(tmp_path / "tiles", out) == 0
    assert "redoing" not in capsys.readouterr().out and (folder / "corrupt.h5").stat().st_mtime_ns == stamp
