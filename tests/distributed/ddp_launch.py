"""Helpers of the multi-process tests: six small slides, and `torchrun` on this CPU (gloo, 1 thread each)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from conftest import make_tissue_image
from histodistill.wsi.tiff_writer import write_pyramid_tiff

HERE = Path(__file__).parent
ROOT = HERE.parents[1]


def six_slides(folder: Path) -> Path:
    """``folder`` with six 384 x 384 pyramidal TIFFs at 0.5 mpp, each with its own tissue texture."""
    folder.mkdir(parents=True)
    for index in range(6):
        image = make_tissue_image(384, 384, ((0, 0, 384, 256),), seed=index)
        write_pyramid_tiff(folder / f"slide_{index}.tif", image, mpp=0.5, tile=128)
    return folder


def torchrun(
    script: str,
    *args: str,
    nproc: int = 2,
    env: dict[str, str] | None = None,
    extra: tuple[str, ...] = ("--standalone",),
    timeout: float = 600,
) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node nproc tests/distributed/<script> args`` on the CPU, one thread per
    process."""
    environment = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "PYTHONPATH": os.pathsep.join(
            [str(ROOT / "src"), str(ROOT / "tests"), str(HERE), os.environ.get("PYTHONPATH", "")]
        ),
        **(env or {}),
    }
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *extra,
        "--nproc-per-node",
        str(nproc),
        str(HERE / script),
        *args,
    ]
    # A session of its own, so a hung launch is killed with all its workers rather than leaving them behind.
    with subprocess.Popen(
        command,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
