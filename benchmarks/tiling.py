"""Tiling speed: tissue detection and tiling per slide, and tile reading through the Dataset.

The Dataset figure is a ratio against the raw cost of the same reads (`Slide.read_at_mpp` in a
plain loop, measured in this run), so it shows what the Dataset, tensor conversion and the
DataLoader add or win back with workers. Runs on the real sample slide when it is cached
(`histodistill samples fetch cmu_small_region`), otherwise on a generated slide, and says which.

    python -m benchmarks.tiling
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import markdown_table, median_seconds, write_section

PATCH_SIZE = 128
BATCH_SIZE = 32


def generated_slide(folder: Path) -> Path:
    """A 3072 x 3072 pyramid at 0.5 mpp with pink/purple texture in a disk covering ~40 % of it."""
    from histodistill.wsi.tiff_writer import write_pyramid_tiff

    rng = np.random.default_rng(0)
    size = 3072
    yy, xx = np.mgrid[:size, :size]
    inside = (xx - size / 2) ** 2 + (yy - size / 2) ** 2 < (0.36 * size) ** 2
    mix = rng.random((size, size, 1), dtype=np.float32) ** 3
    texture = np.array([225, 120, 170], np.float32) * (1 - mix) + np.array([90, 60, 150], np.float32) * mix
    image = np.where(inside[..., None], texture, np.array([242, 240, 244], np.float32)).astype(np.uint8)
    return write_pyramid_tiff(folder / "generated.tif", image, mpp=0.5)


def tiles_per_second(loader) -> float:
    start = time.perf_counter()
    count = sum(len(coords) for _, coords in loader)
    return count / (time.perf_counter() - start)


def main() -> None:
    import torch
    from torch.utils.data import DataLoader

    # Collation is one memory copy per batch; on a busy 2-core machine intra-op threads only spin
    # against the loader (measured: torch.stack of a batch 250x slower with 2 threads than with 1).
    torch.set_num_threads(1)

    from histodistill.data.slide_dataset import SlideTileDataset
    from histodistill.samples.registry import cached_path
    from histodistill.wsi.slide import close_all, open_slide
    from histodistill.wsi.tiling import tile_slide
    from histodistill.wsi.tissue import TissueConfig, tissue_mask

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        slide_path = cached_path("cmu_small_region")
        source = "the real sample slide CMU-1-Small-Region (2220 x 2967 px, 0.499 mpp)"
        if slide_path is None:
            slide_path = generated_slide(tmp)
            source = "a generated 3072 x 3072 px slide at 0.5 mpp (the sample slide is not cached)"
        config = TissueConfig()

        def detect() -> None:
            close_all()  # a cold open each time, as a tiling run meets each slide once
            slide = open_slide(slide_path)
            tissue_mask(slide.get_thumbnail(config.thumbnail_size), config)

        def tile() -> None:
            close_all()
            tile_slide(slide_path, tmp / "out", target_mpp=0.5, patch_size=PATCH_SIZE, overwrite=True)

        detect_s = median_seconds(detect, repeats=3)
        tile_s = median_seconds(tile, repeats=3)
        dataset = SlideTileDataset(tmp / "out" / "patches" / f"{Path(slide_path).stem}.h5")
        slide = open_slide(slide_path, mpp=dataset.mpp)

        def raw() -> None:
            for x, y in dataset.coords:
                slide.read_at_mpp((int(x), int(y)), dataset.patch_size, dataset.target_mpp)

        raw_rate = len(dataset) / median_seconds(raw, repeats=3)
        rows = [["raw `read_at_mpp` loop (baseline)", f"{raw_rate:.0f}", "1.00"]]
        for workers in (0, 2):
            loader = DataLoader(dataset, batch_size=BATCH_SIZE, num_workers=workers, persistent_workers=workers > 0)
            tiles_per_second(loader)  # warm-up: worker start and slide opening are not per-tile costs
            rate = float(np.median([tiles_per_second(loader) for _ in range(3)]))
            rows.append([f"`SlideTileDataset` + DataLoader, {workers} workers", f"{rate:.0f}", f"{rate / raw_rate:.2f}"])

    load = os.getloadavg()[0]
    body = f"""
Load average during the run: {load:.1f} on {os.cpu_count()} cores (other jobs share the machine, so
differences within about 30 % are noise). Slide: {source}. Tiles of {PATCH_SIZE} px at 0.5 mpp, minimum tissue 0.5, default `TissueConfig`
(thumbnail {config.thumbnail_size} px); {len(dataset)} tiles kept. Medians of 3 runs.

{markdown_table(["step", "seconds per slide"], [["tissue detection (open, thumbnail, mask)", f"{detect_s:.2f}"],
                                                ["whole `tile_slide` (detection, grid, h5, QC PNG, status)", f"{tile_s:.2f}"]])}

{markdown_table(["tile reading", "tiles / s", "ratio to raw"], rows)}

The ratio is the figure: below 1 is overhead of the Dataset and the DataLoader (tensor conversion,
collation, torch threads set to 1), above 1 is what worker processes win back; on this 2-core machine
two workers compete with the main process, so expect more from real GPU hosts with many cores.
"""
    write_section("tiling", "Tiling and tile reading", body)


if __name__ == "__main__":
    main()
