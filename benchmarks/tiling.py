"""Tiling speed: a realistic 20x slide per stage and as whole `tile` processes, the sample slide,
and tile reading through the Dataset.

The realistic slide (issue 12) is a 30000 x 24000, 0.5 mpp JPEG pyramid TIFF (levels 1/4/16/64)
with six tissue islands cut from the sample images (two of them small fragments), a black border
strip and a navy pen stroke; it is rendered tile by tile (never whole in memory) into
``$HISTODISTILL_BENCH_DIR`` (default: a temporary folder) and reused from there. Whole-process
figures run `histodistill tile` in fresh interpreters, on one slide and on
``$HISTODISTILL_BENCH_SLIDES`` (default 8) hard-linked copies with ``--workers 2``. With
``$HISTODISTILL_BASELINE_SRC`` pointing at an older ``src/`` the same runs are made with it, so
speed is a ratio measured in the same run.

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
SRC = str(Path(__file__).resolve().parents[1] / "src")


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


# ---- the realistic 20x slide (issue 12) ----------------------------------------------------------

REAL_SIZE = (30000, 24000)  # level-0 (W, H) at 0.5 mpp: a 15 x 12 mm section, as a 20x scan
REAL_MPP = 0.5
BORDER_PX = 600  # a black strip along the left edge, as slide holders leave
# Tissue islands: (centre x, centre y, radius x, radius y) at level 0, with the sample each is cut
# from; the last two are small (0.4 x 0.3 mm and 0.3 x 0.3 mm), as detached fragments are.
ISLANDS = (
    (8000, 7000, 4500, 3800, "hgsc_stromal_he"),
    (20000, 8000, 3500, 4200, "cmu_small_region"),
    (13000, 17500, 5000, 3000, "hgsc_nest"),
    (24500, 18000, 2500, 2200, "tiatoolbox_target"),
    (4000, 19500, 800, 600, "hgsc_stromal_he"),
    (27500, 3000, 600, 600, "cmu_small_region"),
)
INK_RGB = np.array([69, 61, 119], np.uint8)  # a navy marker stroke over the glass


def island_sources() -> dict[str, np.ndarray]:
    """(h, w, 3) uint8 texture per sample name: the cached sample (the SVS as its tissue-rich crop),
    or a generated H&E-like texture when the sample is not cached."""
    from PIL import Image

    from histodistill.samples.registry import cached_path
    from histodistill.wsi.slide import open_slide

    sources = {}
    rng = np.random.default_rng(1)
    for name in {island[4] for island in ISLANDS}:
        path = cached_path(name)
        if path is None:
            mix = rng.random((1024, 1024, 1), dtype=np.float32) ** 3
            pixels = (
                np.array([225, 120, 170], np.float32) * (1 - mix) + np.array([90, 60, 150], np.float32) * mix
            )
        elif path.suffix == ".svs":
            pixels = open_slide(path).read_region((768, 1920), 0, (768, 768))  # all tissue
        else:
            pixels = np.asarray(Image.open(path).convert("RGB"))
        sources[name] = np.ascontiguousarray(pixels, np.uint8)
    return sources


def render_realistic(sources: dict[str, np.ndarray]):
    """``render(x0, y0, w, h, d)`` for `write_rendered_pyramid_tiff`: glass, islands (their sample
    repeated as a mirrored mosaic inside an ellipse), the black border and a wavy ink stroke."""

    def render(x0: int, y0: int, w: int, h: int, d: int) -> np.ndarray:
        xs = x0 + d * np.arange(w)[None, :]  # (1, w) level-0 columns
        ys = y0 + d * np.arange(h)[:, None]  # (h, 1) level-0 rows
        out = np.empty((h, w, 3), np.uint8)
        out[:] = (242, 240, 244)
        for cx, cy, rx, ry, name in ISLANDS:
            inside = ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1  # (h, w)
            if inside.any():
                src = sources[name]
                sh, sw = src.shape[:2]
                # Mirror every other repeat so the mosaic has no seams.
                u, v = (xs - cx + rx) % (2 * sw), (ys - cy + ry) % (2 * sh)
                u, v = np.where(u < sw, u, 2 * sw - 1 - u), np.where(v < sh, v, 2 * sh - 1 - v)
                out[inside] = src[np.broadcast_to(v, (h, w))[inside], np.broadcast_to(u, (h, w))[inside]]
        stroke = np.abs(ys - (12000 + 1500 * np.sin(xs / 2500.0))) < 120  # 120 um wide, across the glass
        stroke &= (xs > 15000) & (xs < 29000) & (ys > 10000) & (ys < 14000)
        out[np.broadcast_to(stroke, (h, w))] = INK_RGB
        out[:, (xs < BORDER_PX)[0]] = 10
        return out

    return render


def realistic_slide(folder: Path) -> Path:
    """The 30000 x 24000, 0.5 mpp JPEG pyramid TIFF (levels 1/4/16/64), built once per folder."""
    from histodistill.wsi.tiff_writer import write_rendered_pyramid_tiff

    path = folder / "realistic20x.tif"
    if not path.is_file():
        write_rendered_pyramid_tiff(path, REAL_SIZE, render_realistic(island_sources()), mpp=REAL_MPP)
    return path


def islands_found(coords: np.ndarray, patch_level0: int) -> int:
    """How many of `ISLANDS` hold the centre of at least one kept tile."""
    centres = coords + patch_level0 / 2  # (N, 2)
    return sum(
        bool((((centres[:, 0] - cx) / rx) ** 2 + ((centres[:, 1] - cy) / ry) ** 2 <= 1).any())
        for cx, cy, rx, ry, _ in ISLANDS
    )


def run_tile_cli(args: list[str], pythonpath: str) -> tuple[float, float]:
    """Wall seconds and peak memory (MiB: the largest of the process and its workers) of one
    `histodistill tile` run in a fresh interpreter with ``pythonpath`` first on its path."""
    import subprocess
    import sys

    # VmHWM is this process's own peak (ru_maxrss would keep the benchmark's, inherited across exec);
    # RUSAGE_CHILDREN covers the --workers processes.
    code = (
        "import re, resource, sys; from histodistill.cli import main; code = main(sys.argv[1:]); "
        "own = int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)); "
        "print(max(own, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)); sys.exit(code)"
    )
    env = {**os.environ, "PYTHONPATH": pythonpath}
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", code, "tile", *args], check=True, env=env, capture_output=True, text=True
    )
    seconds = time.perf_counter() - start
    return seconds, int(done.stdout.strip().splitlines()[-1]) / 1024  # ru_maxrss is KiB on Linux


def realistic_section(folder: Path) -> str:
    """Markdown for the realistic slide: stages, whole processes, islands found (and the baseline)."""
    from histodistill.wsi.coords import read_coords
    from histodistill.wsi.slide import close_all, open_slide
    from histodistill.wsi.tiling import grid_coords, tile_slide, tissue_fractions
    from histodistill.wsi.tissue import TissueConfig, mask_mpp_for, tissue_mask

    start = time.perf_counter()
    reused = (folder / "realistic20x.tif").is_file()
    path = realistic_slide(folder)
    built = "reused from an earlier run" if reused else f"built in {time.perf_counter() - start:.0f} s"
    config, patch = TissueConfig(), 256

    stages = {
        "open": [],
        "read the detection level": [],
        "tissue mask": [],
        "grid + tissue fractions": [],
        "whole `tile_slide` (+ h5, QC PNG, status)": [],
    }
    for _ in range(3):
        close_all()
        t0 = time.perf_counter()
        slide = open_slide(path)
        t1 = time.perf_counter()
        mask_mpp = mask_mpp_for(config, patch, slide.mpp)
        image = slide.read_downsampled(mask_mpp / slide.mpp)
        t2 = time.perf_counter()
        mask = tissue_mask(image, mask_mpp, config)
        t3 = time.perf_counter()
        grid = grid_coords(slide.dimensions, patch, 0, 1.0)
        tissue_fractions(mask, grid, patch, slide.dimensions)
        t4 = time.perf_counter()
        close_all()
        tile_slide(path, folder / "inproc", patch_size=patch, overwrite=True)
        t5 = time.perf_counter()
        for name, seconds in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4), strict=True):
            stages[name].append(seconds)
    stage_rows = [[name, f"{np.median(v):.3f}"] for name, v in stages.items()]

    n_slides = int(os.environ.get("HISTODISTILL_BENCH_SLIDES", "8"))
    batch = folder / "batch"
    batch.mkdir(exist_ok=True)
    for i in range(n_slides):
        if not (batch / f"slide{i:02d}.tif").exists():
            os.link(path, batch / f"slide{i:02d}.tif")  # hard links: a distinct slide id each, no copy
    codes = [("this version", SRC)]
    if os.environ.get("HISTODISTILL_BASELINE_SRC"):
        codes.append(("baseline (`$HISTODISTILL_BASELINE_SRC`)", os.environ["HISTODISTILL_BASELINE_SRC"]))
    rows, found = [], []
    for label, src in codes:
        out = folder / f"out-{len(found)}"
        one_s, one_mib = run_tile_cli([str(path), "--out", str(out / "one"), "--overwrite"], src)
        coords, attrs = read_coords(out / "one" / "patches" / f"{path.stem}.h5")
        found.append(
            f"{label}: {islands_found(coords, attrs['patch_size_level0'])} of {len(ISLANDS)} islands, "
            f"{len(coords)} tiles"
        )
        many_s, many_mib = run_tile_cli(
            [str(batch), "--out", str(out / "many"), "--workers", "2", "--overwrite"], src
        )
        rows.append(
            [
                label,
                f"{one_s:.2f}",
                f"{one_mib:.0f}",
                f"{many_s:.1f}",
                f"{n_slides / many_s * 60:.1f}",
                f"{many_mib:.0f}",
            ]
        )
    if len(rows) == 2:
        rows.append(
            [
                "ratio this / baseline",
                f"{float(rows[0][1]) / float(rows[1][1]):.2f}",
                f"{float(rows[0][2]) / float(rows[1][2]):.2f}",
                f"{float(rows[0][3]) / float(rows[1][3]):.2f}",
                "",
                f"{float(rows[0][5]) / float(rows[1][5]):.2f}",
            ]
        )
    return f"""
### A realistic 20x slide

30000 x 24000 px at 0.5 mpp, JPEG pyramid TIFF with levels 1/4/16/64 ({built}),
six tissue islands cut from the sample images (two are fragments of 0.4 x 0.3 and 0.3 x 0.3 mm), a
black border strip and a navy pen stroke. 256-px tiles at 0.5 mpp, default settings: the mask is
{mask_mpp:g} um/px, read from the level of downsample {
        slide.level_downsamples[slide.best_level_for_downsample(mask_mpp / slide.mpp)]:g}.
In-process stages, medians of 3 (cold open each time):

{markdown_table(["stage", "seconds per slide"], stage_rows)}

Whole `histodistill tile` processes in fresh interpreters (interpreter start and imports included);
peak memory is the largest resident set of the process and its workers:

{
        markdown_table(
            [
                "code",
                "1 slide: s",
                "1 slide: peak MiB",
                f"{n_slides} slides, --workers 2: s",
                "slides / min",
                "peak MiB",
            ],
            rows,
        )
    }

Islands found (a kept tile's centre inside the island): {"; ".join(found)}.

CLAM's `create_patches_fp` is not run beside them: CLAM is not on PyPI and this machine reaches no
other source, so its figures (1.2 s and 181 MiB on this slide, one island missed, in issue 12's own
run) are not re-measured here.
"""


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
    from histodistill.wsi.tissue import TissueConfig, mask_mpp_for, tissue_mask

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bench_dir = Path(os.environ.get("HISTODISTILL_BENCH_DIR", tmp))
        bench_dir.mkdir(parents=True, exist_ok=True)
        realistic = realistic_section(bench_dir)
        slide_path = cached_path("cmu_small_region")
        source = "the real sample slide CMU-1-Small-Region (2220 x 2967 px, 0.499 mpp)"
        if slide_path is None:
            slide_path = generated_slide(tmp)
            source = "a generated 3072 x 3072 px slide at 0.5 mpp (the sample slide is not cached)"
        config = TissueConfig()

        def detect() -> None:
            close_all()  # a cold open each time, as a tiling run meets each slide once
            slide = open_slide(slide_path)
            mask_mpp = mask_mpp_for(config, PATCH_SIZE * 0.5 / slide.mpp, slide.mpp)
            tissue_mask(slide.read_downsampled(mask_mpp / slide.mpp), mask_mpp, config)

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
            loader = DataLoader(
                dataset, batch_size=BATCH_SIZE, num_workers=workers, persistent_workers=workers > 0
            )
            tiles_per_second(loader)  # warm-up: worker start and slide opening are not per-tile costs
            rate = float(np.median([tiles_per_second(loader) for _ in range(3)]))
            rows.append(
                [
                    f"`SlideTileDataset` + DataLoader, {workers} workers",
                    f"{rate:.0f}",
                    f"{rate / raw_rate:.2f}",
                ]
            )

    load = os.getloadavg()[0]
    body = f"""
Load average during the run: {load:.1f} on {os.cpu_count()} cores (other jobs share the machine, so
differences within about 30 % are noise).
{realistic}
### The sample slide and tile reading

Slide: {source}. Tiles of {PATCH_SIZE} px at 0.5 mpp, minimum tissue 0.5, default `TissueConfig`
(mask at a 16th of a tile); {len(dataset)} tiles kept. Medians of 3 runs.

{
        markdown_table(
            ["step", "seconds per slide"],
            [
                ["tissue detection (open, read level, mask)", f"{detect_s:.2f}"],
                ["whole `tile_slide` (detection, grid, h5, QC PNG, status)", f"{tile_s:.2f}"],
            ],
        )
    }

{markdown_table(["tile reading", "tiles / s", "ratio to raw"], rows)}

The ratio is the figure: below 1 is overhead of the Dataset and the DataLoader (tensor conversion,
collation, torch threads set to 1), above 1 is what worker processes win back; on this 2-core machine
two workers compete with the main process, so expect more from real GPU hosts with many cores.
"""
    write_section("tiling", "Tiling and tile reading", body)


if __name__ == "__main__":
    main()
