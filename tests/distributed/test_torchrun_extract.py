"""`tile` and `extract` launched by torchrun on 2 CPU processes (gloo): a rank killed mid-run leaves only
valid outputs, and the rerun completes them with every slide exactly once and the same features as one
process. (One test, two launches: each launch starts three Python processes.)"""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from ddp_launch import six_slides, torchrun

from histodistill.cli import main

pytestmark = pytest.mark.slow

MODEL = "tiny/resnet18-64"
FOLDER = "features_tiny-resnet18-64-random-init"


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
        assert np.array_equal(coords, reference[slide_id][1]), slide_id
        assert np.array_equal(features, reference[slide_id][0]), slide_id


def test_two_ranks_survive_a_killed_rank_and_end_with_every_slide_once_as_one_process(tmp_path):
    slides = six_slides(tmp_path / "slides")
    assert (
        main(
            ["tile", str(slides), "--out", str(tmp_path / "ref_tiles"), "--mpp", "1.0", "--patch-size", "64"]
        )
        == 0
    )
    assert (
        main(
            [
                "extract",
                "--model",
                MODEL,
                "--random-init",
                "--coords",
                str(tmp_path / "ref_tiles"),
                "--out",
                str(tmp_path / "ref"),
                "--workers",
                "0",
                "--batch-size",
                "4",
            ]
        )
        == 0
    )
    reference = _features(tmp_path / "ref" / FOLDER)
    folder = tmp_path / "out" / FOLDER
    args = (str(slides), str(tmp_path / "tiles"), str(tmp_path / "out"))

    killed = torchrun("cli_worker.py", *args, "1", "1")  # rank 1 dies (SIGKILL) after its first feature file
    assert killed.returncode != 0
    # Tiling finished first, split 3 + 3 by the two ranks.
    assert killed.stdout.count("3 slides: 3 tiled") == 2, killed.stdout
    assert "torchrun rank 1/2: share 1 of 2, 3 of 6 slides" in killed.stdout
    survivors = _features(folder)
    assert "slide_1" in survivors and not {"slide_3", "slide_5"} <= set(survivors), sorted(survivors)
    _assert_same(survivors, reference)  # whatever exists is complete and right
    stamps = {s: (folder / f"{s}.h5").stat().st_mtime_ns for s in survivors}

    rerun = torchrun("cli_worker.py", *args)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    for rank in (0, 1):  # each rank takes the same half of the sorted slides as before, for tile and extract
        assert rerun.stdout.count(f"torchrun rank {rank}/2: share {rank} of 2, 3 of 6 slides") == 2, (
            rerun.stdout
        )
    assert rerun.stdout.count("3 slides: 0 tiled, 3 already done") == 2
    found = _features(folder)
    assert sorted(found) == sorted(reference) == [f"slide_{i}" for i in range(6)]
    _assert_same(found, reference)
    # Finished slides were kept as they were, not extracted again.
    assert {s: (folder / f"{s}.h5").stat().st_mtime_ns for s in survivors} == stamps
    assert json.loads((folder / "extractor.json").read_text()) == json.loads(
        (tmp_path / "ref" / FOLDER / "extractor.json").read_text()
    )
