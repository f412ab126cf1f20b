"""Run by torchrun as one of two single-process "nodes" for tests/distributed/test_mcmkd_cache.py:
a one-step MCM-KD fit whose data module must build the teacher cache once for both nodes.

    torchrun --nnodes 2 --node-rank K --nproc-per-node 1 ... mcmkd_worker.py OUT TILES

Every build of the cache appends the node's rank to OUT/builds.txt.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from histodistill.cli import main
from histodistill.features import teacher_cache

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "mcmkd" / "tiny_cpu.yaml"


def counting_builds(log: Path):
    build = teacher_cache.extract_slides

    def counted(*args, **kwargs):
        with open(log, "a") as handle:  # O_APPEND: one whole line per write, whatever the other node does
            handle.write(f"{os.environ['GROUP_RANK']}\n")
        return build(*args, **kwargs)

    return counted


if __name__ == "__main__":
    out, tiles = Path(sys.argv[1]), sys.argv[2]
    teacher_cache.extract_slides = counting_builds(out / "builds.txt")
    sys.exit(
        main(
            [
                "fit",
                "--config",
                str(CONFIG),
                "--data.init_args.tiles_dir",
                tiles,
                "--trainer.default_root_dir",
                str(out / "run"),
                "--trainer.strategy",
                "ddp",
                "--trainer.accelerator",
                "cpu",
                "--trainer.num_nodes",
                "2",
                "--trainer.devices",
                "1",
                "--trainer.max_steps",
                "1",
                "--trainer.enable_progress_bar",
                "false",
                "--trainer.enable_model_summary",
                "false",
            ]
        )
    )
