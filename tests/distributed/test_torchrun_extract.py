"""`tile` and `extract` launched by torchrun on 2 CPU processes (gloo): every slide exactly once, the same
features as one process, and a rank killed mid-run leaves valid outputs that a rerun completes."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from ddp_launch import six_slides, torchrun

from histodistill.cli import main

MODEL = "tiny/resnet18-64"
FOLDER = "features_tiny-resnet18-64"


@pytest.fixture
def single_process(tmp_path):
    """(slides folder, features folder of a one-process run over the same slides)."""
    slides = six_slides(tmp_path / "slides")
    assert main(["tile", str(slides), "--out", str(tmp_path / "ref_tiles"), "--mpp", "1.0", "--patch-size", "64"]) == 0
    assert main(["extract", "--model", MODEL, "--coords", str(tmp_path / "ref_tiles"), "--out",
                 str(tmp_path / "ref"), "--workers", "0", "--batch-size", "4"]) == 0
    return slides, tmp_path / "ref" / FOLDER


def _features(folder):
    """{slide id: (features, coords)} of the finished (non-hidden) feature files of a folder."""
    found = {}
    for path in sorted(folder.glob("*.h5")):
        if not path.name.startswith("."):
            with h5py.File(path) as handle:
                found[path.stem] = handle["features"][:], handle["coords"][:]
    return found


def _assert_same(found, reference):
    for slide_id, (features, coords) in found.items():
        assert np.array_equal(coords, reference[slide_id][1])
        assert np.array_equal(features, reference[slide_id][0]), slide_id


def test_two_ranks_do_every_slide_once_with_the_single_process_features(single_process, tmp_path):
    slides, reference_dir = single_process
    run = torchrun("cli_worker.py", str(slides), str(tmp_path / "tiles"), str(tmp_path / "out"))
    assert run.returncode == 0, run.stdout + run.stderr
    # Each rank announces its share: 3 of 6 slides each, for tile and for extract.
    assert run.stdout.count("torchrun rank 0/2: share 0 of 2, 3 of 6 slides") == 2, run.stdout
    assert run.stdout.count("torchrun rank 1/2: share 1 of 2, 3 of 6 slides") == 2, run.stdout
    assert "6 slides: 6 tiled" not in run.stdout and run.stdout.count("3 slides: 3 tiled") == 2

    reference = _features(reference_dir)
    found = _features(tmp_path / "out" / FOLDER)
    assert sorted(found) == sorted(reference) == [f"slide_{i}" for i in range(6)]
    _assert_same(found, reference)
    assert json.loads((tmp_path / "out" / FOLDER / "extractor.json").read_text()) == json.loads(
        (reference_dir / "extractor.json").read_text())
    assert sorted(p.name for p in (tmp_path / "out" / FOLDER).iterdir()) == ["extractor.json"] + [
        f"slide_{i}.h5" for i in range(6)]  # no temporary file left behind


def test_a_killed_rank_leaves_valid_outputs_and_a_rerun_finishes_only_the_missing_slides(single_process, tmp_path):
    slides, reference_dir = single_process
    reference = _features(reference_dir)
    args = (str(slides), str(tmp_path / "tiles"), str(tmp_path / "out"))

    killed = torchrun("cli_worker.py", *args, "1", "1")  # rank 1 dies after its first feature file
    assert killed.returncode != 0
    survivors = _features(tmp_path / "out" / FOLDER)
    assert "slide_1" in survivors and not {"slide_3", "slide_5"} <= set(survivors), sorted(survivors)
    _assert_same(survivors, reference)  # whatever exists is complete and right
    stamps = {s: (tmp_path / "out" / FOLDER / f"{s}.h5").stat().st_mtime_ns for s in survivors}

    rerun = torchrun("cli_worker.py", *args)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    found = _features(tmp_path / "out" / FOLDER)
    assert sorted(found) == sorted(reference)
    _assert_same(found, reference)
    # Finished slides were kept as they were, not extracted again.
    assert {s: (tmp_path / "out" / FOLDER / f"{s}.h5").stat().st_mtime_ns for s in survivors} == stamps
