"""MCM-KD on two nodes sharing a filesystem (two torchrun launches on this machine, one CPU process each):
the teacher cache is built once, by global rank 0, and the other node trains on it."""

from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor

import pytest
from ddp_launch import torchrun

from histodistill.features.teacher_cache import CACHE_RECORD
from histodistill.wsi.tiling import tile_slide

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_nodes_build_the_teacher_cache_once(tiny_slide, tmp_path):
    tile_slide(tiny_slide.path, tmp_path / "tiles", target_mpp=0.5, patch_size=64)
    port = free_port()

    def node(rank: int):
        rendezvous = (
            "--nnodes",
            "2",
            "--node-rank",
            str(rank),
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(port),
        )
        return torchrun("mcmkd_worker.py", str(tmp_path), str(tmp_path / "tiles"), nproc=1, extra=rendezvous)

    with ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(node, (0, 1)))
    for run in runs:
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    assert (tmp_path / "builds.txt").read_text().split() == ["0"]
    # The tiny recipe states teacher_pretrained: false: the cache folder says random init.
    assert (tmp_path / "tiles" / "features_tiny-vit-tiny-p8-64-random-init" / CACHE_RECORD).is_file()
