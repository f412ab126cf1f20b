"""Semi-synthetic whole slides with a known answer, assembled from real H&E tiles.

The task: does the slide carry carcinoma? Each slide is a grid of ``grid × grid`` cells of ``tile_px``
pixels: glass outside an elliptical piece of tissue, **benign** tiles (stroma, inflammatory cells)
inside it; **positive** slides also carry one contiguous region of **tumour-nest** tiles covering a
per-slide fraction of the tissue (default 20–50 %, so some slides are easy and some hard).

The tiles come from image regions that no extractor of `histodistill demo` was trained on:
- tumour nest: crops of ``hgsc_nest`` right of the nuclei task's train/test split (``split_x``; the
  nuclei task trains only on crops left of it), where at least 70 % of the typed nucleus pixels are
  neoplastic (the sample's own type raster says which);
- benign: crops of the same region with (almost) no neoplastic nucleus pixels, and crops of
  ``hgsc_stromal_he`` (never used for training). The demo's SD-MAE pretrains on CMU-1-Small-Region,
  which is therefore not a source. Both classes draw benign tissue from ``hgsc_nest``, so "which image
  did this tile come from" does not give the label away.

Colour: each tile is Reinhard-normalised on its own (tissue pixels' LAB mean and sd moved to one
target, the mean of the sources' statistics; repeated until it converges) and slides are written
losslessly, so per-tile colour statistics carry no label. What is
left is morphology, including how much of a tile is nuclei; a colour-histogram control measures how
far that alone goes (`benchmarks/mil.py`).

The tissue is real; the slides are not: tiles are pasted side by side (seams at tile borders, no real
tissue architecture across tiles), tiles of a slide repeat pixels of the same few source regions, and
the tumour region is wherever we put it. The ground truth (which grid cells are tumour) is exact,
which is what localisation scores need.

Outputs under ``out_dir``: ``slides/<slide_id>.tif`` (pyramidal TIFF), ``masks/<slide_id>.npy``
((grid, grid) bool, row = y, column = x: cell (r, c) is level-0 pixels [c·tile_px, (c+1)·tile_px) ×
[r·tile_px, (r+1)·tile_px)), ``labels.csv`` (case_id,slide_id,label) and ``synthetic.json``.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np

from histodistill.distributed import usable_cpus
from histodistill.errors import UserError
from histodistill.io import atomic_path, write_json
from histodistill.samples.stain_norm import TISSUE_LIGHTNESS, lab_stats, reinhard_normalize, rgb_to_lab
from histodistill.wsi.tiff_writer import write_pyramid_tiff

GLASS_RGB = (242, 240, 244)
MIN_TISSUE_FRACTION = 0.7  # a source crop must be at least this much tissue to become a tile
# A tumour-nest crop: neoplastic nucleus pixels are at least 15 % of the crop (at 5 % a crop could be one
# cut nucleus in stroma) and 70 % of its typed nucleus pixels. A benign crop of hgsc_nest: at most 0.5 %
# of its pixels are neoplastic nucleus.
MIN_NEOPLASTIC_AREA, MIN_NEOPLASTIC_SHARE, MAX_BENIGN_NEOPLASTIC_AREA = 0.15, 0.7, 0.005
NEOPLASTIC_TYPE = 3  # hgsc_nest's type raster: 1 connective, 2 inflammatory, 3 neoplastic
LABELS = ("negative", "positive")


class Source(NamedTuple):
    """A source image (H, W, 3) uint8 and, optionally, which crop top-lefts it may give:
    ``allowed`` (H - tile_px + 1, W - tile_px + 1) bool, ``None`` = anywhere with enough tissue."""

    name: str
    image: np.ndarray
    allowed: np.ndarray | None = None


def crop_fraction(mask: np.ndarray, tile_px: int) -> np.ndarray:
    """(H - t + 1, W - t + 1): the share of each ``t × t`` crop's pixels that are True in ``mask`` (H, W),
    indexed by the crop's top-left (y, x); one summed-area table, O(1) per crop."""
    t = tile_px
    s = np.pad(mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))  # (H + 1, W + 1)
    return (s[t:, t:] - s[:-t, t:] - s[t:, :-t] + s[:-t, :-t]) / t**2


def hgsc_nest_sources(
    image: np.ndarray, type_mask: np.ndarray, split_x: int, tile_px: int
) -> dict[str, Source]:
    """Tumour-nest and benign crops of ``hgsc_nest`` (H, W, 3), from its (H, W) type raster, only where
    the crop lies entirely right of ``split_x`` (the nuclei task's test side)."""
    neoplastic = crop_fraction(type_mask == NEOPLASTIC_TYPE, tile_px)
    typed = crop_fraction(type_mask > 0, tile_px)
    held_out = np.zeros_like(neoplastic, bool)
    held_out[:, split_x:] = True
    share = neoplastic / np.maximum(typed, 1e-9)
    tumor = held_out & (neoplastic >= MIN_NEOPLASTIC_AREA) & (share >= MIN_NEOPLASTIC_SHARE)
    benign = held_out & (neoplastic <= MAX_BENIGN_NEOPLASTIC_AREA)
    return {"tumor": Source("hgsc_nest", image, tumor), "benign": Source("hgsc_nest", image, benign)}


def load_sample_sources(tile_px: int) -> dict[str, list[Source]]:
    """The real sources by role (``tumor``, ``benign``); a `UserError` if a sample is not cached."""
    from PIL import Image

    from histodistill.samples.nuclei import load_hgsc
    from histodistill.samples.registry import cached_path

    missing = [
        n
        for n in ("hgsc_nest", "hgsc_nest_inst_mask", "hgsc_nest_type_mask", "hgsc_stromal_he")
        if cached_path(n) is None
    ]
    if missing:
        raise UserError(
            f"the semi-synthetic slides are built from sample images that are not cached: {missing}. "
            f"Run `histodistill samples fetch` first"
        )
    image, instance_mask, type_mask = load_hgsc()
    split_x = _nest_split_x(instance_mask, type_mask)
    nest = hgsc_nest_sources(image, type_mask, split_x, tile_px)
    stroma = Source("hgsc_stromal_he", np.asarray(Image.open(cached_path("hgsc_stromal_he")).convert("RGB")))
    return {"tumor": [nest["tumor"]], "benign": [nest["benign"], stroma]}


def _nest_split_x(instance_mask: np.ndarray, type_mask: np.ndarray) -> int:
    """hgsc_nest's column where the slides' sources begin: the nuclei task's own train/test split (its
    default test fraction and 64-px crops), whose training crops end left of it."""
    from histodistill.samples.nuclei import choose_split_x, find_nuclei

    return choose_split_x(find_nuclei(instance_mask, type_mask).centres_xy[:, 0], test_fraction=0.3)


def unlabeled_tissue(out_dir: Path, mpp: float) -> list[Path]:
    """The sample H&E that no slide of `make_slides` is cut from, written as pyramidal TIFFs at ``mpp`` (the
    slides' scale: a pixel of the sources is a pixel of the slides) under ``out_dir``, for self-supervised
    pretraining beside CMU-1-Small-Region: ``hgsc_nest`` left of the split (the nuclei task's training side,
    unlabeled here) and ``tiatoolbox_target`` (a 1000 × 1000 carcinoma). Fetches the samples if needed."""
    from PIL import Image

    from histodistill.samples.nuclei import load_hgsc
    from histodistill.samples.registry import fetch

    image, instance_mask, type_mask = load_hgsc()
    images = {
        "hgsc_nest_train_side": image[:, : _nest_split_x(instance_mask, type_mask)],
        "tiatoolbox_target": np.asarray(Image.open(fetch("tiatoolbox_target")).convert("RGB")),
    }
    return [
        write_pyramid_tiff(out_dir / f"{name}.tif", np.ascontiguousarray(pixels), mpp=mpp, compression="zlib")
        for name, pixels in images.items()
    ]


class TilePool:
    """Random crops of one role's sources (uniform over sources, then over allowed tissue-rich
    top-lefts), each with a random 90° turn and flip."""

    def __init__(self, sources: Sequence[Source], tile_px: int) -> None:
        self.tile_px = tile_px
        self.images, self.positions = [], []
        for source in sources:
            if min(source.image.shape[:2]) < tile_px:
                continue
            ok = (
                crop_fraction(rgb_to_lab(source.image)[..., 0] < TISSUE_LIGHTNESS, tile_px)
                >= MIN_TISSUE_FRACTION
            )
            if source.allowed is not None:
                ok &= source.allowed
            if ok.any():
                self.images.append(source.image)
                self.positions.append(np.argwhere(ok))  # (M, 2) top-left (y, x)
        if not self.images:
            raise ValueError(f"no source offers a {tile_px}-px crop with {MIN_TISSUE_FRACTION:.0%} tissue")

    def draw(self, rng: np.random.Generator) -> np.ndarray:
        """One (tile_px, tile_px, 3) uint8 crop."""
        index = int(rng.integers(len(self.images)))
        y, x = self.positions[index][rng.integers(len(self.positions[index]))]
        crop = self.images[index][y : y + self.tile_px, x : x + self.tile_px]
        crop = np.rot90(crop, k=int(rng.integers(4)))
        return np.ascontiguousarray(crop[:, ::-1] if rng.random() < 0.5 else crop)


def tissue_cells(grid: int, rng: np.random.Generator) -> np.ndarray:
    """(grid, grid) bool: a random ellipse of tissue covering most of the grid."""
    rows, cols = np.mgrid[0:grid, 0:grid] + 0.5
    centre = grid / 2 + rng.uniform(-0.5, 0.5, 2)
    radii = grid / 2 * rng.uniform(0.75, 1.0, 2)
    return ((rows - centre[0]) / radii[0]) ** 2 + ((cols - centre[1]) / radii[1]) ** 2 <= 1


def tumor_region(tissue: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """(grid, grid) bool: a 4-connected region of about ``fraction`` of the tissue cells, grown from a
    random tissue cell by adding random tissue neighbours of the region."""
    cells = np.argwhere(tissue)
    size = max(2, round(fraction * len(cells)))
    region = np.zeros_like(tissue)
    region[tuple(cells[rng.integers(len(cells))])] = True
    while region.sum() < size:
        frontier = [
            (r + dr, c + dc)
            for r, c in np.argwhere(region)
            for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1))
            if 0 <= r + dr < tissue.shape[0]
            and 0 <= c + dc < tissue.shape[1]
            and tissue[r + dr, c + dc]
            and not region[r + dr, c + dc]
        ]
        if not frontier:
            break
        region[frontier[rng.integers(len(frontier))]] = True
    return region


class StainTarget(NamedTuple):
    """The LAB mean (3,) and sd (3,) every tile's tissue is moved to."""

    mean: np.ndarray
    std: np.ndarray


# Reinhard passes per tile: one pass leaves dark (tumour) tiles a few LAB units off the target, a residual
# a colour-only classifier reads (tile AUROC 0.94 measured on one pass); ten bring every tile to 0.05.
NORMALISE_PASSES = 10
# Each tile's own target: the slide set's target moved by class-independent noise (sd of the LAB means in
# LAB units; sd of the log of the LAB sds). Ten passes still leave residuals of 0.05-0.2 LAB units whose
# spread differs by class (tumour 0.06, benign 0.19 in L), which a standardised colour-only classifier
# read as tile AUROC 0.67; noise ten times larger, the same for both classes, drowns them.
STAIN_JITTER_MEAN = 2.0
STAIN_JITTER_LOG_SD = 0.08


class SlideDraw(NamedTuple):
    """Everything random about one slide, drawn from the generator in a fixed order (`draw_slide`), so
    rendering it (`render_slide`: pure arithmetic) can run in any order or thread."""

    slide_id: str
    positive: bool
    cells: np.ndarray  # (grid, grid) bool: tissue
    tumor: np.ndarray  # (grid, grid) bool: tumour cells (none on a negative slide)
    tiles: np.ndarray  # (n, t, t, 3) uint8: the source crop of each tissue cell, in np.argwhere(cells) order
    means: np.ndarray  # (n, 3): each tile's LAB mean target
    stds: np.ndarray  # (n, 3): each tile's LAB sd target


def draw_slide(
    slide_id: str,
    positive: bool,
    grid: int,
    tumor_fraction: tuple[float, float],
    pools: dict[str, TilePool],
    target: StainTarget,
    rng: np.random.Generator,
) -> SlideDraw:
    """The tissue, tumour region, source tiles and per-tile stain targets of one slide: ``target`` moved
    by each tile's own class-independent jitter."""
    cells = tissue_cells(grid, rng)
    tumor = tumor_region(cells, rng.uniform(*tumor_fraction), rng) if positive else np.zeros_like(cells)
    tiles = np.stack([pools["tumor" if tumor[r, c] else "benign"].draw(rng) for r, c in np.argwhere(cells)])
    means = target.mean + rng.normal(0.0, STAIN_JITTER_MEAN, (len(tiles), 3))  # (n, 3)
    stds = target.std * np.exp(rng.normal(0.0, STAIN_JITTER_LOG_SD, (len(tiles), 3)))
    return SlideDraw(slide_id, positive, cells, tumor, tiles, means, stds)


def render_slide(slide: SlideDraw) -> np.ndarray:
    """Paste a tile per tissue cell on glass, each Reinhard-normalised on its own to its target.
    Returns (grid·t, grid·t, 3) uint8."""
    t = slide.tiles.shape[1]
    image = np.empty((slide.cells.shape[0] * t, slide.cells.shape[1] * t, 3), np.uint8)
    image[:] = GLASS_RGB
    tiles = reinhard_normalize(
        slide.tiles, slide.means, slide.stds, TISSUE_LIGHTNESS, iterations=NORMALISE_PASSES
    )
    for (r, c), tile in zip(np.argwhere(slide.cells), tiles, strict=True):
        image[r * t : (r + 1) * t, c * t : (c + 1) * t] = tile
    return image


def write_slide(slide: SlideDraw, out_dir: Path, mpp: float) -> None:
    """``slides/<id>.tif`` and ``masks/<id>.npy`` of one drawn slide, each written atomically."""
    # Lossless: JPEG's chroma subsampling blurs colour more in busy (tumour) tiles than in calm ones, a
    # residual of texture in the colour statistics that a colour-only classifier reads.
    write_pyramid_tiff(
        out_dir / "slides" / f"{slide.slide_id}.tif", render_slide(slide), mpp=mpp, compression="zlib"
    )
    with atomic_path(out_dir / "masks" / f"{slide.slide_id}.npy") as tmp, tmp.open("wb") as handle:
        np.save(handle, slide.tumor)


def make_slides(
    out_dir: str | os.PathLike,
    n_slides: int = 60,
    seed: int = 0,
    tile_px: int = 64,
    mpp: float = 0.5,
    grid: int = 8,
    tumor_fraction: tuple[float, float] = (0.2, 0.5),
    sources: dict[str, Sequence[Source]] | None = None,
    workers: int | None = None,
) -> Path:
    """Write ``n_slides`` semi-synthetic slides (half positive) under ``out_dir``; return the labels CSV.

    ``sources`` maps ``"benign"`` and ``"tumor"`` to lists of `Source` (default: the cached sample
    regions of `load_sample_sources`; tests pass small synthetic ones). ``tumor_fraction`` bounds the
    share of a positive slide's tissue cells that are tumour (drawn uniformly per slide; at least 2
    cells). The same arguments give byte-identical files, whatever ``workers``: the threads that render
    and write the slides (default: the usable CPUs). Every random draw is made in the calling thread, in
    slide order; the threads only do arithmetic, and NumPy releases the GIL in it.
    """
    if n_slides < 2:
        raise UserError(f"n_slides must be at least 2 (one per class), got {n_slides}")
    out_dir = Path(out_dir)
    sources = load_sample_sources(tile_px) if sources is None else sources
    named = {role: sorted({s.name for s in sources[role]}) for role in ("benign", "tumor")}
    unique = {id(s.image): s.image for role in ("benign", "tumor") for s in sources[role]}
    stats = [lab_stats(image, TISSUE_LIGHTNESS) for image in unique.values()]
    target = StainTarget(np.mean([m for m, _ in stats], axis=0), np.mean([s for _, s in stats], axis=0))
    pools = {role: TilePool(sources[role], tile_px) for role in ("benign", "tumor")}
    rng = np.random.default_rng(seed)
    positives = np.zeros(n_slides, bool)
    positives[rng.permutation(n_slides)[: n_slides // 2]] = True
    workers = workers or usable_cpus()
    rows, summary = [], []
    with ThreadPoolExecutor(workers) as pool:
        # A few slides per thread at a time: the drawn source tiles of every slide at once would grow with
        # n_slides.
        for start in range(0, n_slides, 4 * workers):
            drawn = [
                draw_slide(f"synth_{i:03d}", bool(positives[i]), grid, tumor_fraction, pools, target, rng)
                for i in range(start, min(start + 4 * workers, n_slides))
            ]
            list(pool.map(lambda slide: write_slide(slide, out_dir, mpp), drawn))
            for slide in drawn:
                rows.append((slide.slide_id, slide.slide_id, LABELS[int(slide.positive)]))
                summary.append(
                    {
                        "slide_id": slide.slide_id,
                        "tissue_tiles": int(slide.cells.sum()),
                        "tumor_tiles": int(slide.tumor.sum()),
                    }
                )
    labels_csv = out_dir / "labels.csv"
    with atomic_path(labels_csv) as tmp, tmp.open("w", newline="") as handle:
        csv.writer(handle).writerows([("case_id", "slide_id", "label"), *rows])
    write_json(
        out_dir / "synthetic.json",
        {
            "semi_synthetic": True,
            "seed": seed,
            "tile_px": tile_px,
            "mpp": mpp,
            "grid": grid,
            "tumor_fraction": list(tumor_fraction),
            "sources": named,
            "stain_normalisation": "Reinhard, per tile, to the target with per-tile jitter",
            "stain_jitter": {"lab_mean_sd": STAIN_JITTER_MEAN, "log_lab_sd_sd": STAIN_JITTER_LOG_SD},
            "stain_target_lab_mean": target.mean.round(3).tolist(),
            "stain_target_lab_std": target.std.round(3).tolist(),
            "slides": summary,
        },
    )
    return labels_csv


def tumor_tile_labels(
    masks_dir: str | os.PathLike, slide_id: str, coords: np.ndarray, tile_px: int, patch_px: int | None = None
) -> np.ndarray:
    """(N,) bool: whether the centre of each level-0 patch (top-left coords (N, 2) as (x, y), side
    ``patch_px``, default ``tile_px``) lies in a tumour cell of the slide's mask."""
    mask = np.load(Path(masks_dir) / f"{slide_id}.npy")  # (grid, grid), row = y
    centres = coords + (patch_px or tile_px) // 2
    cells = np.clip(centres // tile_px, 0, np.array(mask.shape[::-1]) - 1)  # (N, 2) as (col, row)
    return mask[cells[:, 1], cells[:, 0]]
