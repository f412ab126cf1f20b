"""Semi-synthetic whole slides with a known answer, assembled from real H&E tiles.

Each slide is a grid of ``grid × grid`` cells of ``tile_px`` pixels: glass outside an elliptical
piece of tissue, benign tiles inside it (skin from CMU-1-Small-Region, stroma from hgsc_stromal_he).
Positive slides also carry one contiguous region of carcinoma tiles (hgsc_nest, the TIA Toolbox
target image). Every source image is first Reinhard-normalised to one LAB target (the mean of the
sources' statistics), so a classifier cannot tell tumour from benign by colour alone.

The tissue is real; the slides are not: tiles are pasted side by side (seams at tile borders, no
real tissue architecture across tiles), and the "tumour region" is wherever we put it. The ground
truth (which grid cells are tumour) is exact, which is what attention-localisation scores need.

Outputs under ``out_dir``: ``slides/<slide_id>.tif`` (pyramidal TIFF), ``masks/<slide_id>.npy``
((grid, grid) bool, row = y, column = x: cell (r, c) is level-0 pixels [c·tile_px, (c+1)·tile_px) ×
[r·tile_px, (r+1)·tile_px)), ``labels.csv`` (case_id,slide_id,label) and ``synthetic.json``.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from histodistill.errors import UserError
from histodistill.io import atomic_path, write_json
from histodistill.samples.stain_norm import lab_stats, reinhard_normalize, rgb_to_lab
from histodistill.wsi.tiff_writer import write_pyramid_tiff

BENIGN_SAMPLES = ("cmu_small_region", "hgsc_stromal_he")
TUMOR_SAMPLES = ("hgsc_nest", "tiatoolbox_target")
GLASS_RGB = (242, 240, 244)
TISSUE_LIGHTNESS = 85.0  # LAB L below this is tissue, above is glass / empty background
MIN_TISSUE_FRACTION = 0.7  # a source crop must be at least this much tissue to become a tile
LABELS = ("negative", "positive")


def load_sample_sources() -> dict[str, list[np.ndarray]]:
    """The real sample images as (H, W, 3) uint8, by role; a `UserError` if any is not cached."""
    from histodistill.samples.registry import cached_path
    from histodistill.wsi.slide import open_slide

    missing = [n for n in BENIGN_SAMPLES + TUMOR_SAMPLES if cached_path(n) is None]
    if missing:
        raise UserError(
            f"the semi-synthetic slides are built from sample images that are not cached: {missing}. "
            f"Run `histodistill samples fetch` first"
        )

    def read(name: str) -> np.ndarray:
        slide = open_slide(cached_path(name), mpp=0.5)  # every source is scanned at ~0.5 mpp (20x)
        return slide.read_region((0, 0), 0, slide.dimensions)

    return {"benign": [read(n) for n in BENIGN_SAMPLES], "tumor": [read(n) for n in TUMOR_SAMPLES]}


class TilePool:
    """Random tissue crops of one role's (stain-normalised) sources, with random 90° turns and flips."""

    def __init__(self, images: Sequence[np.ndarray], tile_px: int) -> None:
        self.tile_px = tile_px
        self.images = [im for im in images if min(im.shape[:2]) >= tile_px]
        if not self.images:
            raise ValueError(f"no source image is at least {tile_px} px on each side")
        # Summed-area tables of the tissue mask make each candidate crop's tissue fraction O(1).
        self.tissue_sums = []
        for image in self.images:
            tissue = (rgb_to_lab(image)[..., 0] < TISSUE_LIGHTNESS).astype(np.int64)
            self.tissue_sums.append(np.pad(tissue.cumsum(0).cumsum(1), ((1, 0), (1, 0))))  # (H+1, W+1)

    def _tissue_fraction(self, index: int, y: int, x: int) -> float:
        s, t = self.tissue_sums[index], self.tile_px
        return (s[y + t, x + t] - s[y, x + t] - s[y + t, x] + s[y, x]) / t**2

    def draw(self, rng: np.random.Generator, attempts: int = 50) -> np.ndarray:
        """One (tile_px, tile_px, 3) crop: the first of ``attempts`` random crops that is mostly tissue
        (the most tissue-rich one seen if none is)."""
        best, best_fraction = None, -1.0
        for _ in range(attempts):
            index = int(rng.integers(len(self.images)))
            height, width = self.images[index].shape[:2]
            y, x = int(rng.integers(height - self.tile_px + 1)), int(rng.integers(width - self.tile_px + 1))
            fraction = self._tissue_fraction(index, y, x)
            if fraction > best_fraction:
                best, best_fraction = (index, y, x), fraction
            if fraction >= MIN_TISSUE_FRACTION:
                break
        index, y, x = best
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
            if 0 <= r + dr < tissue.shape[0] and 0 <= c + dc < tissue.shape[1]
            and tissue[r + dr, c + dc] and not region[r + dr, c + dc]
        ]
        if not frontier:
            break
        region[frontier[rng.integers(len(frontier))]] = True
    return region


def assemble(cells: np.ndarray, tumor: np.ndarray, pools: dict[str, TilePool], rng: np.random.Generator) -> np.ndarray:
    """Paste a tile per cell: glass, benign tissue, or tumour. Returns (grid·t, grid·t, 3) uint8."""
    t = pools["benign"].tile_px
    image = np.empty((cells.shape[0] * t, cells.shape[1] * t, 3), np.uint8)
    image[:] = GLASS_RGB
    for r, c in np.argwhere(cells):
        tile = pools["tumor" if tumor[r, c] else "benign"].draw(rng)
        image[r * t : (r + 1) * t, c * t : (c + 1) * t] = tile
    return image


def make_slides(
    out_dir: str | os.PathLike,
    n_slides: int = 24,
    seed: int = 0,
    tile_px: int = 160,
    mpp: float = 0.5,
    grid: int = 10,
    tumor_fraction: tuple[float, float] = (0.1, 0.3),
    sources: dict[str, Sequence[np.ndarray]] | None = None,
) -> Path:
    """Write ``n_slides`` semi-synthetic slides (half positive) under ``out_dir``; return the labels CSV.

    ``sources`` maps ``"benign"`` and ``"tumor"`` to lists of (H, W, 3) uint8 images (default: the
    cached sample images; tests pass small synthetic ones). ``tumor_fraction`` bounds the share of a
    positive slide's tissue cells that are tumour. The same arguments give byte-identical files.
    """
    if n_slides < 2:
        raise UserError(f"n_slides must be at least 2 (one per class), got {n_slides}")
    out_dir = Path(out_dir)
    source_names = {"benign": list(BENIGN_SAMPLES), "tumor": list(TUMOR_SAMPLES)} if sources is None else "given"
    sources = load_sample_sources() if sources is None else sources
    stats = [lab_stats(image, TISSUE_LIGHTNESS) for role in ("benign", "tumor") for image in sources[role]]
    target_mean, target_std = np.mean([m for m, _ in stats], axis=0), np.mean([s for _, s in stats], axis=0)
    pools = {
        role: TilePool([reinhard_normalize(im, target_mean, target_std, TISSUE_LIGHTNESS) for im in sources[role]], tile_px)
        for role in ("benign", "tumor")
    }
    rng = np.random.default_rng(seed)
    positives = np.zeros(n_slides, bool)
    positives[rng.permutation(n_slides)[: n_slides // 2]] = True
    rows, summary = [], []
    for i, positive in enumerate(positives):
        slide_id = f"synth_{i:03d}"
        cells = tissue_cells(grid, rng)
        tumor = tumor_region(cells, rng.uniform(*tumor_fraction), rng) if positive else np.zeros_like(cells)
        write_pyramid_tiff(out_dir / "slides" / f"{slide_id}.tif", assemble(cells, tumor, pools, rng), mpp=mpp)
        with atomic_path(out_dir / "masks" / f"{slide_id}.npy") as tmp, tmp.open("wb") as handle:
            np.save(handle, tumor)
        rows.append((slide_id, slide_id, LABELS[int(positive)]))
        summary.append({"slide_id": slide_id, "tissue_tiles": int(cells.sum()), "tumor_tiles": int(tumor.sum())})
    labels_csv = out_dir / "labels.csv"
    with atomic_path(labels_csv) as tmp, tmp.open("w", newline="") as handle:
        csv.writer(handle).writerows([("case_id", "slide_id", "label"), *rows])
    write_json(out_dir / "synthetic.json", {
        "semi_synthetic": True, "seed": seed, "tile_px": tile_px, "mpp": mpp, "grid": grid,
        "tumor_fraction": list(tumor_fraction), "sources": source_names,
        "stain_target_lab_mean": target_mean.round(3).tolist(), "stain_target_lab_std": target_std.round(3).tolist(),
        "slides": summary,
    })
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
