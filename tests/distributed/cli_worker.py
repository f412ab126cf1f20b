"""Run by torchrun in the tests: `histodistill tile` then `histodistill extract`, as each rank of a launch.

    torchrun --nproc-per-node 2 cli_worker.py SLIDES TILES FEATURES [DIE_RANK DIE_AFTER]

With DIE_RANK/DIE_AFTER, that rank kills itself (SIGKILL: no cleanup, like a lost node) right after it
has written DIE_AFTER feature files.
"""

from __future__ import annotations

import os
import signal
import sys

import torch.distributed as dist

from histodistill.cli import main
from histodistill.features import extract

MODEL = "tiny/resnet18-64"


def die_after(count: int) -> None:
    write, written = extract.write_slide_features, []

    def write_then_maybe_die(*args, **kwargs):
        write(*args, **kwargs)
        written.append(args[0])
        if len(written) == count:
            os.kill(os.getpid(), signal.SIGKILL)

    extract.write_slide_features = write_then_maybe_die


if __name__ == "__main__":
    slides, tiles, features, *death = sys.argv[1:]
    if death and int(os.environ["RANK"]) == int(death[0]):
        die_after(int(death[1]))
    # One process group for both commands (they use it as they find it): destroying and re-creating the
    # default group on torchrun's store can race between ranks.
    dist.init_process_group("gloo")
    code = main(["tile", slides, "--out", tiles, "--mpp", "1.0", "--patch-size", "64"])
    dist.barrier()  # extract lists the coords files: every rank's tiling must be finished
    code = code or main(
        [
            "extract",
            "--model",
            MODEL,
            "--random-init",
            "--coords",
            tiles,
            "--out",
            features,
            "--workers",
            "0",
            "--batch-size",
            "4",
        ]
    )
    sys.exit(code)
