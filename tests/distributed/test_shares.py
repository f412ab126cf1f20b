"""Which process takes which slides: the launcher's rank, `--shard I/N`, and both combined."""

from __future__ import annotations

import json

import pytest
from ddp_launch import six_slides

from histodistill.cli import main
from histodistill.distributed import Share, launcher_rank, parse_shard, this_process, write_json_once
from histodistill.errors import UserError
from histodistill.io import write_json_if_absent


def test_rank_comes_from_torchrun_or_from_an_srun_step_but_not_from_a_batch_script():
    assert launcher_rank({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}) == (3, 8, 1, "torchrun")
    srun = {"SLURM_PROCID": "9", "SLURM_STEP_NUM_TASKS": "32", "SLURM_LOCALID": "1", "SLURM_NTASKS": "32"}
    assert launcher_rank(srun) == (9, 32, 1, "srun")
    # The batch script of an sbatch --ntasks=32 job is one process: it must do every slide itself.
    assert launcher_rank({"SLURM_PROCID": "0", "SLURM_NTASKS": "32"}) == (0, 1, None, "single process")
    # torchrun started by srun: torchrun's ranks are the processes.
    assert launcher_rank({**srun, "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})[3] == "torchrun"
    with pytest.raises(UserError, match="RANK=2 is not below WORLD_SIZE=2"):
        launcher_rank({"RANK": "2", "WORLD_SIZE": "2"})


@pytest.mark.parametrize("text", ["2/2", "-1/2", "1", "a/b", "1/0"])
def test_a_bad_shard_is_a_user_error(text):
    with pytest.raises(UserError, match="`shard="):
        parse_shard(text)


def test_shards_times_ranks_take_every_item_exactly_once():
    items = list(range(103))
    taken = []
    for shard in range(3):
        for rank in range(4):
            share = this_process(
                f"{shard}/3", {"RANK": str(rank), "WORLD_SIZE": "4", "LOCAL_RANK": str(rank % 2)}
            )
            assert share.count == 12 and share.local_rank == rank % 2
            taken += share.select(items)
    assert sorted(taken) == items
    assert this_process(None, {}) == Share() and Share().select(items) == items


def test_a_record_is_written_once_and_never_half(tmp_path):
    path = tmp_path / "sub" / "extractor.json"
    assert write_json_if_absent(path, {"weights_sha256": "a"}) is True
    assert write_json_if_absent(path, {"weights_sha256": "b"}) is False
    write_json_once(path, {"weights_sha256": "c"}, Share(1, 2))  # no process group: only where absent
    assert json.loads(path.read_text()) == {"weights_sha256": "a"}
    write_json_once(path, {"weights_sha256": "d"}, Share(1, 2), replace=True)  # --overwrite
    assert json.loads(path.read_text()) == {"weights_sha256": "d"}
    assert [p.name for p in path.parent.iterdir()] == ["extractor.json"]  # no temporary file left


def test_a_job_array_of_two_shards_tiles_and_extracts_every_slide_once(tmp_path, capsys):
    slides = six_slides(tmp_path / "slides")
    tiles, out = tmp_path / "tiles", tmp_path / "out"
    for shard in ("1/2", "0/2"):
        assert (
            main(
                [
                    "tile",
                    str(slides),
                    "--out",
                    str(tiles),
                    "--mpp",
                    "1.0",
                    "--patch-size",
                    "64",
                    "--shard",
                    shard,
                ]
            )
            == 0
        )
        assert "3 slides: 3 tiled" in capsys.readouterr().out
    assert sorted(p.stem for p in (tiles / "patches").glob("*.h5")) == [f"slide_{i}" for i in range(6)]

    folder = out / "features_tiny-resnet18-64-random-init"
    extract = [
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
        "--shard",
    ]
    assert main([*extract, "0/2"]) == 0
    assert "shard 0/2: share 0 of 2, 3 of 6 slides" in capsys.readouterr().out
    assert sorted(p.stem for p in folder.glob("*.h5")) == ["slide_0", "slide_2", "slide_4"]
    assert main([*extract, "1/2"]) == 0
    assert sorted(p.stem for p in folder.glob("*.h5")) == [f"slide_{i}" for i in range(6)]
    capsys.readouterr()
    assert main([*extract, "2/2"]) == 2
    assert capsys.readouterr().err.startswith("error: --shard 2/2: expected I/N")
