"""Attention heatmaps over slide thumbnails, and montages of the most and least attended tiles.

A MIL run (`histodistill mil`) leaves ``attention/<slide_id>.h5`` with each tile's level-0 top-left
``coords`` (N, 2) and ``scores`` (N,). Here every tile becomes a box on the thumbnail, at thumbnail
scale (level-0 px / downsample), filled with its colour; the thumbnail shows through (``alpha``).
Colours follow the score's rank among the slide's tiles (``scale="rank"``, robust to the peaked
softmax of attention) or its value (``scale="value"``). Regions the slide file cannot give (a corrupt
JPEG tile) are drawn `MISSING` grey, on the thumbnail and in the montage, and named in one warning per slide.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Literal

import h5py
import matplotlib

matplotlib.use("Agg")  # figures go to files; never open a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from histodistill.errors import UserError  # noqa: E402
from histodistill.io import atomic_path  # noqa: E402

MAX_WIDTH_PX = 1600  # figures are sized for a screen
DPI = 100
MISSING = (128, 128, 128)  # pixels the slide file cannot give: neither tissue nor glass
Scale = Literal["rank", "value"]


def read_attention(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, dict]:
    """``coords`` (N, 2) int64, ``scores`` (N,) float32 and the attributes of an attention file.

    Raises `UserError` naming the file when it is truncated, not HDF5, or lacks a dataset."""
    try:
        with h5py.File(path, "r") as handle:
            coords, scores = handle["coords"][:].astype(np.int64), handle["scores"][:].astype(np.float32)
            return coords, scores, dict(handle.attrs)
    except (OSError, KeyError) as error:
        raise UserError(
            f"attention file {path} cannot be read ({type(error).__name__}: {error}): it is truncated "
            "or not from `histodistill mil`; run `histodistill mil` again to rewrite it"
        ) from None


def rank_scale(scores: np.ndarray) -> np.ndarray:
    """(N,) scores -> (N,) ranks in [0, 1] (0 = lowest, 1 = highest; ties keep their order)."""
    ranks = np.empty(len(scores))
    ranks[np.argsort(scores, kind="stable")] = np.arange(len(scores))
    return ranks / max(len(scores) - 1, 1)


def score_raster(
    shape_hw: tuple[int, int],
    coords: np.ndarray,
    values: np.ndarray,
    patch_size_level0: int,
    downsample: float,
) -> np.ndarray:
    """(h, w) float raster at thumbnail scale: each tile's box holds its value, NaN where no tile is.

    Overlapping tiles: the later one in ``coords`` order wins, which for the usual row-major grids is
    the tile whose top-left lies in the overlap.
    """
    raster = np.full(shape_hw, np.nan)
    # (N, 4)
    boxes = np.round(np.concatenate([coords, coords + patch_size_level0], axis=1) / downsample).astype(int)
    boxes = np.clip(boxes, 0, [shape_hw[1], shape_hw[0], shape_hw[1], shape_hw[0]])
    for (x0, y0, x1, y1), value in zip(boxes, values, strict=True):
        raster[y0 : max(y1, y0 + 1), x0 : max(x1, x0 + 1)] = value  # at least one pixel per tile
    return raster


def infer_patch_size_level0(coords: np.ndarray) -> int:
    """The grid step of the coords (their patch size when tiles do not overlap), for files that lack it."""
    steps = [np.diff(np.unique(coords[:, axis])) for axis in (0, 1)]
    steps = np.concatenate([s[s > 0] for s in steps])
    if not len(steps):
        raise UserError(
            "cannot infer the patch size from a single tile: add patch_size_level0 to the features file"
        )
    return int(steps.min())


def overlay(
    thumbnail: np.ndarray, raster: np.ndarray, cmap: str, alpha: float, vmin: float, vmax: float
) -> np.ndarray:
    """(h, w, 3) uint8: the raster's colours blended over the thumbnail with opacity ``alpha``; pixels
    without a tile (NaN) keep the thumbnail as it is."""
    normalized = np.clip((raster - vmin) / max(vmax - vmin, 1e-12), 0, 1)
    colours = plt.get_cmap(cmap)(np.nan_to_num(normalized))[..., :3] * 255  # (h, w, 3)
    blended = (1 - alpha) * thumbnail + alpha * colours
    return np.where(np.isfinite(raster)[..., None], blended, thumbnail).round().astype(np.uint8)


def draw_heatmap(
    path: str | os.PathLike,
    thumbnail: np.ndarray,
    raster: np.ndarray,
    scale: Scale,
    title: str = "",
    alpha: float = 0.5,
    cmap: str = "inferno",
) -> None:
    """The thumbnail beside the thumbnail with the raster over it, and a colour bar; PNG ≤ 1600 px wide."""
    h, w = thumbnail.shape[:2]
    width_in = MAX_WIDTH_PX / DPI
    figure, axes = plt.subplots(1, 2, figsize=(width_in, width_in / 2 * h / w + 0.8), dpi=DPI)
    finite = raster[np.isfinite(raster)]
    vmin, vmax = (
        (0.0, 1.0) if scale == "rank" or not len(finite) else (float(finite.min()), float(finite.max()))
    )
    axes[0].imshow(thumbnail)
    axes[1].imshow(overlay(thumbnail, raster, cmap, alpha, vmin, vmax))
    for ax, name in zip(axes, ("thumbnail", title or "attention"), strict=True):
        ax.set_axis_off()
        ax.set_title(name)
    mappable = matplotlib.cm.ScalarMappable(matplotlib.colors.Normalize(vmin, vmax), cmap)
    bar = figure.colorbar(mappable, ax=axes[1], fraction=0.046, pad=0.02)
    bar.set_label("attention rank (0 = lowest, 1 = highest)" if scale == "rank" else "attention score")
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=DPI)
    plt.close(figure)


def draw_montage(
    path: str | os.PathLike,
    top: list[np.ndarray],
    bottom: list[np.ndarray],
    top_scores,
    bottom_scores,
    title: str = "",
) -> None:
    """Two rows of tiles: the ``k`` highest-scored (top row) and the ``k`` lowest; PNG ≤ 1600 px wide."""
    k = max(len(top), len(bottom), 1)
    cell_in = min(2.0, MAX_WIDTH_PX / DPI / k)
    figure, axes = plt.subplots(2, k, figsize=(cell_in * k, cell_in * 2 + 0.6), dpi=DPI, squeeze=False)
    for row, (tiles, scores, name) in enumerate(
        ((top, top_scores, "top"), (bottom, bottom_scores, "bottom"))
    ):
        for col in range(k):
            ax = axes[row, col]
            ax.set_axis_off()
            if col < len(tiles):
                ax.imshow(tiles[col])
                ax.set_title(f"{name} {col + 1}: {scores[col]:.3g}", fontsize=8)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=DPI)
    plt.close(figure)


def slide_heatmap(
    slide_path: str | os.PathLike,
    attention_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    top_k: int = 8,
    scale: Scale = "rank",
    alpha: float = 0.5,
    thumbnail_size: int = 1024,
    tile_px: int = 160,
) -> tuple[Path, Path]:
    """Write ``<out_dir>/<slide_id>_heatmap.png`` and ``<slide_id>_tiles.png``; return both paths.

    Box geometry is the tiling's: the attention file's ``patch_size_level0`` (carried from the coords
    through the features file), else the coords' grid step; never the slide's metadata, which may be
    the very thing `tile --mpp-override` corrected.
    """
    from histodistill.wsi.slide import UnreadableRegion, open_slide

    coords, scores, attrs = read_attention(attention_path)
    slide = open_slide(slide_path)
    slide_id = Path(attention_path).stem
    patch0 = (
        int(attrs["patch_size_level0"]) if "patch_size_level0" in attrs else infer_patch_size_level0(coords)
    )
    slide.unreadable.clear()  # the slide is cached per process: only this figure's reads
    thumbnail = slide.get_thumbnail(thumbnail_size).copy()
    downsample = slide.dimensions[0] / thumbnail.shape[1]
    for damage in slide.unreadable:  # read as glass by `get_thumbnail`; drawn as missing instead
        (x, y), scale = damage.location, slide.level_downsamples[damage.level] / downsample
        x0, y0 = int(x / downsample), int(y / downsample)
        thumbnail[
            y0 : y0 + max(1, round(damage.size[1] * scale)), x0 : x0 + max(1, round(damage.size[0] * scale))
        ] = MISSING
    damaged = list(slide.unreadable)
    values = rank_scale(scores) if scale == "rank" else scores
    raster = score_raster(thumbnail.shape[:2], coords, values, patch0, downsample)
    # The class name where the run wrote one (older runs: the class index).
    label = attrs.get("label_name", attrs.get("label"))
    title = f"{slide_id}: attention" + (
        f" (true class: {label}, scored by fold {attrs.get('fold')})" if label is not None else ""
    )
    out_dir = Path(out_dir)
    heatmap_path, montage_path = out_dir / f"{slide_id}_heatmap.png", out_dir / f"{slide_id}_tiles.png"
    draw_heatmap(heatmap_path, thumbnail, raster, scale, title, alpha)
    order = np.argsort(-scores, kind="stable")
    k = min(top_k, len(order) // 2 or 1)

    def tile(index: int) -> np.ndarray:
        try:
            pixels = slide.read_region(tuple(coords[index]), 0, (patch0, patch0))
        except UnreadableRegion as damage:
            damaged.append(damage)
            return np.full((tile_px, tile_px, 3), MISSING, np.uint8)
        return np.asarray(Image.fromarray(pixels).resize((tile_px, tile_px)))

    top, bottom = order[:k], order[::-1][:k]
    draw_montage(
        montage_path,
        [tile(i) for i in top],
        [tile(i) for i in bottom],
        scores[top],
        scores[bottom],
        f"{slide_id}: top and bottom {k} tiles",
    )
    if damaged:
        from tqdm import tqdm

        (x, y), regions = damaged[0].location, len({(d.location, d.level) for d in damaged})
        tqdm.write(
            f"warning: slide {slide_id}: {regions} region(s) of {slide.path} cannot be read (corrupt or "
            f"damaged; first: level-0 ({x}, {y}): {damaged[0].reason}); drawn grey (missing) in "
            f"{heatmap_path.name} and {montage_path.name}",
            file=sys.stderr,
        )
    return heatmap_path, montage_path


def csv_slide_paths(source: Path) -> dict[str, Path]:
    """slide_id -> slide file from a ``slide_id,path`` CSV (relative paths are relative to the CSV)."""
    from histodistill.data.table import read_table

    rows = read_table(source, "slides CSV (`slides`)", ("slide_id", "path")).rows
    return {row["slide_id"]: (source.parent / row["path"]).resolve() for row in rows}


def run_heatmaps(
    run: str | os.PathLike,
    slides: str | os.PathLike | None = None,
    slide_ext: str | None = None,
    slide_ids: list[str] | None = None,
    out: str | os.PathLike | None = None,
    top_k: int = 8,
    scale: Scale = "rank",
    alpha: float = 0.5,
    thumbnail_size: int = 1024,
) -> tuple[list[str], Path]:
    """`slide_heatmap` for every slide with attention in a MIL run directory ``run`` (``run/attention``), or
    ``slide_ids``; returns (the slides drawn, the output folder: ``out``, default ``run/figures/heatmaps``).

    Slides are found by the ``slide_path`` their tiling recorded, or in ``slides``: a folder of
    ``<slide_id>.<ext>`` files (``slide_ext``) or a ``slide_id,path`` CSV. Every attention file is read and
    every slide found before any figure is drawn: a `UserError` names what is missing or damaged."""
    from tqdm import tqdm

    from histodistill.io import visible_files
    from histodistill.wsi.coords import find_slide

    run = Path(run)
    attention = {p.stem: p for p in visible_files(run / "attention", (".h5",))}
    if not attention:
        seeds = sorted(p.name for p in run.glob("seed_*") if (p / "attention").is_dir())
        raise UserError(
            f"no attention files in {run / 'attention'}: "
            + (
                f"{run} holds the runs of several CV seeds, pass one of them as `run=...` "
                f"({', '.join(seeds)} in {run})"
                if seeds
                else "pass as `run=...` the run directory of a MIL cross-validation (`histodistill mil "
                "--out`)"
            )
        )
    wanted = slide_ids or sorted(attention)
    if unknown := [s for s in wanted if s not in attention]:
        raise UserError(f"`slide_ids={unknown}`: no attention for them in {run / 'attention'}")
    attrs = {slide_id: read_attention(attention[slide_id])[2] for slide_id in wanted}
    if slides is not None and Path(slides).is_file():
        paths = csv_slide_paths(Path(slides))
        if missing := [s for s in wanted if s not in paths]:
            raise UserError(
                f"`slides={slides}` has no slide for {missing[:5]}: add them or restrict `slide_ids=...`"
            )
    else:
        paths = {s: find_slide(attention[s], {**attrs[s], "slide_id": s}, slides, slide_ext) for s in wanted}
    out = Path(out) if out else run / "figures" / "heatmaps"
    for slide_id in tqdm(wanted, desc="heatmaps", unit="slide", dynamic_ncols=True):
        slide_heatmap(
            paths[slide_id],
            attention[slide_id],
            out,
            top_k=top_k,
            scale=scale,
            alpha=alpha,
            thumbnail_size=thumbnail_size,
        )
    return wanted, out
