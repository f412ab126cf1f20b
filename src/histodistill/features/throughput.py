"""How fast a backbone turns tiles into features on this machine, and which machine that is.

Two rates, both in tiles per second:
- end to end (`timed_extraction`): what `extract_slides` achieved over the slides it wrote (reading, resizing,
  normalising and the forward pass), the number a lab's extraction run will see;
- forward only (`forward_rate`): the network alone on random tiles already on the device, which the data
  pipeline cannot hide (on a GPU a slow reader caps the end-to-end rate of every model alike).
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import h5py
import torch

from histodistill.data.feature_files import COORDS
from histodistill.distributed import usable_cpus
from histodistill.models.backbones import Backbone

# The cohort the projection speaks of: 10,000 slides of 10,000 tiles (10^8 tiles).
PROJECTED_SLIDES = 10_000
PROJECTED_TILES_PER_SLIDE = 10_000


def timed_extraction(extract: Callable[[], Path], search_dir: str | os.PathLike) -> tuple[Path, float | None]:
    """Run ``extract``, which writes features files under ``search_dir`` and returns their folder; returns
    that folder and the end-to-end tiles/s over the files this call wrote (None when it wrote none: a resumed
    extraction had nothing left to do, so no rate was measured)."""
    done_before = {path.resolve() for path in Path(search_dir).rglob("*.h5")}
    start = time.perf_counter()
    folder = Path(extract())
    seconds = time.perf_counter() - start
    tiles = 0
    for path in folder.glob("*.h5"):
        if path.resolve() not in done_before:
            with h5py.File(path, "r") as handle:
                tiles += len(handle[COORDS])
    return folder, (round(tiles / seconds, 1) if tiles and seconds > 0 else None)


@torch.inference_mode()
def forward_rate(
    backbone: Backbone, device: str = "cpu", batch_size: int = 32, seconds: float = 2.0, precision: str = "32"
) -> float:
    """Tiles/s of ``backbone`` alone: batches of ``batch_size`` random (3, S, S) tiles at its input size S,
    repeated for about ``seconds`` after one warm-up batch; ``precision`` ``bf16`` autocasts (GPUs)."""
    size = backbone.preprocess.input_size
    model = backbone.to(device).eval()
    images = torch.randn(batch_size, 3, size, size, device=device)
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16")
    batches, start = 0, None
    with autocast:
        while start is None or time.perf_counter() - start < seconds:
            model(images)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            if start is None:
                start = time.perf_counter()  # after the warm-up batch
                continue
            batches += 1
    return round(batches * batch_size / (time.perf_counter() - start), 1) if batches else 0.0


def parameters(backbone: Backbone) -> int:
    return sum(p.numel() for p in backbone.model.parameters())


def projected_hours(tiles_per_s: float | None) -> float | None:
    """Hours to extract `PROJECTED_SLIDES` slides of `PROJECTED_TILES_PER_SLIDE` tiles at ``tiles_per_s``."""
    if not tiles_per_s:
        return None
    return round(PROJECTED_SLIDES * PROJECTED_TILES_PER_SLIDE / tiles_per_s / 3600, 1)


def cpu_model() -> str:
    """The CPU's model name as lscpu shows it (``/proc/cpuinfo``), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: str) -> dict:
    """``{cpu, cores, gpu}``: the CPU model, usable cores, and the GPU's name when ``device`` is a CUDA device
    (else None)."""
    gpu = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else None
    return {"cpu": cpu_model(), "cores": usable_cpus(), "gpu": gpu}
