"""Context windows for MCM-KD: s x s neighbouring tiles of a tiled slide, read as one image.

A window is anchored on a tissue tile of a coords file (ours, CLAM's or TRIDENT's). Its cells are
the s x s tile positions around the anchor, spaced by the tile size at level 0
(``patch_size_level0``); the anchor sits at cell ((s-1)//2, (s-1)//2), the centre when s is odd
(for even s, the upper-left of the four central cells). A cell is *valid* when its position is a
tile of the coords file (tissue with a teacher feature); a window is kept when at least
``min_fraction`` of its s^2 cells are valid. With ``window_stride`` k only tiles whose grid column
and row are multiples of k anchor a window: k = 1 (the default) gives overlapping windows, in which a
tile is a cell of up to s^2 windows per epoch; k = s gives disjoint windows, each tile at most once.
Each window is ONE read of P = s * patch_size pixels: for our coords `Slide.read_at_mpp` at the
tiling's target mpp, for CLAM's and TRIDENT's (no mpp) `Slide.read_box` of s * patch_size_level0
level-0 pixels resized to P, which is how those tools' tiles are read too; either way its cells are
pixel-aligned with the tiles the teacher saw. Cells are in row-major order: index ``i * s + j`` is
row i (y), column j (x).
"""

from __future__ import annotations

import os
from collections.abc import Collection
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset

from histodistill.data.slide_dataset import next_readable
from histodistill.data.teacher_features import TeacherFeatures
from histodistill.data.transforms import build_transform
from histodistill.errors import UserError
from histodistill.io import visible_files
from histodistill.wsi.coords import find_slide, read_coords
from histodistill.wsi.slide import open_slide


def has_mpp(attrs: dict) -> bool:
    """Whether a coords file states its resolution in mpp (ours), rather than only in level-0 pixels (CLAM,
    TRIDENT): our grid is then computed exactly as the tiler laid it out."""
    return "target_mpp" in attrs and "mpp" in attrs


def grid_geometry(attrs: dict, source: str | os.PathLike) -> tuple[float, int]:
    """The tiling grid of a coords file: (stride in level-0 pixels, grid steps from one cell to the next).

    `histodistill tile` puts column k at ``round(k * stride)`` with ``stride = (patch_size - overlap) *
    scale``, ``scale = target_mpp / mpp``; CLAM and TRIDENT state no mpp, so their stride is
    ``patch_size_level0 * (patch_size - overlap) / patch_size`` (CLAM records no overlap: its default step is
    the patch size). Window cells must abut, so they are ``patch_size / (patch_size - overlap)`` grid steps
    apart.
    """
    patch_size, overlap = int(attrs["patch_size"]), int(attrs.get("overlap", 0))
    if patch_size % (patch_size - overlap):
        raise UserError(
            f"{source}: tiles of {patch_size} px with overlap {overlap} do not abut on a grid, so they "
            "cannot form context windows; tile again with `overlap=0` (or an overlap that divides the patch "
            "size evenly)"
        )
    if has_mpp(attrs):
        stride = (patch_size - overlap) * float(attrs["target_mpp"]) / float(attrs["mpp"])
    else:
        stride = float(attrs["patch_size_level0"]) * (patch_size - overlap) / patch_size
    return stride, patch_size // (patch_size - overlap)


def cell_offsets(side: int) -> np.ndarray:
    """(s*s, 2) int64 (x, y) offsets of the cells from the anchor tile in cells, row-major."""
    anchor = (side - 1) // 2
    rows, cols = np.meshgrid(np.arange(side) - anchor, np.arange(side) - anchor, indexing="ij")
    return np.stack([cols.ravel(), rows.ravel()], axis=1).astype(np.int64)  # (s*s, 2) as (x, y)


def window_cells(
    coords: np.ndarray,
    stride: float,
    cell_steps: int,
    side: int,
    min_fraction: float = 1.0,
    window_stride: int = 1,
    on_grid: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The windows of a coords file.

    Args:
        coords: (N, 2) int64 tile top-lefts (x, y) at level 0.
        stride, cell_steps: from `grid_geometry`.
        window_stride: anchor windows only on tiles whose cell column and row are multiples of it.
        on_grid: the tiles sit at ``round(k * stride)`` (our tiler; cells are computed the same way). False
            (CLAM, TRIDENT): cells are placed from the anchor and take the coords of the tile within a quarter
            stride of them, since CLAM lays a grid per tissue contour and truncates a fractional level-0 step.
    Returns:
        anchors (M,) int64 row of each window's anchor tile in ``coords``;
        cell_coords (M, s*s, 2) int64 top-left of every cell (whether a tile or not);
        valid (M, s*s) bool, True where the cell is a tile of ``coords``.
    """
    if not 0 < min_fraction <= 1:
        raise UserError(f"data.min_fraction must be in (0, 1], got {min_fraction}")
    if window_stride < 1:
        raise UserError(f"data.window_stride must be >= 1, got {window_stride}")
    grid_index = np.round(coords / stride).astype(np.int64)  # (N, 2) column/row of each tile
    if on_grid:
        cell_index = grid_index[:, None, :] + cell_offsets(side)[None] * cell_steps  # (N, s*s, 2)
        cells = np.round(cell_index * stride).astype(np.int64)  # the same rounding as the tiler
        tiles = {(int(x), int(y)) for x, y in coords}
        valid = np.array([(int(x), int(y)) in tiles for x, y in cells.reshape(-1, 2)], dtype=bool)
    else:
        cells, valid = _snap_to_tiles(coords, np.round(cell_offsets(side) * cell_steps * stride), stride / 4)
    # (N, s*s)
    cells, valid = (
        cells.reshape(len(coords), side * side, 2),
        valid.reshape(len(coords), side * side),
    )
    # A small tolerance so that a threshold written as 0.888 keeps windows with 8 of 9 cells.
    keep = valid.mean(axis=1) >= min_fraction - 1e-3
    keep &= (grid_index % (window_stride * cell_steps) == 0).all(axis=1)  # anchors on every k-th cell
    return np.flatnonzero(keep).astype(np.int64), cells[keep], valid[keep]


def _snap_to_tiles(
    coords: np.ndarray, offsets: np.ndarray, tolerance: float
) -> tuple[np.ndarray, np.ndarray]:
    """(N*s*s, 2) int64 cells at ``coords + offsets`` (offsets (s*s, 2) level-0 px), each replaced by the tile
    within ``tolerance`` (Chebyshev distance) of it if there is one, and (N*s*s,) bool: whether there is."""
    from scipy.spatial import cKDTree

    wanted = (coords[:, None, :] + offsets[None]).reshape(-1, 2)  # (N*s*s, 2)
    distance, row = cKDTree(coords).query(wanted, p=np.inf, distance_upper_bound=tolerance)
    valid = np.isfinite(distance)
    cells = wanted.astype(np.int64)
    cells[valid] = coords[row[valid]]
    return cells, valid


def window_transform(preprocess, side: int):
    """uint8 (3, P, P) window -> float (3, s*S, s*S) normalised with the backbone's mean/std, S its input
    size.

    Each cell is thus resized exactly as `extract` resizes a lone tile to S, so the student sees tissue
    at the same scale in fine-tuning and in extraction. No augmentation: spatial ones would have to
    permute the cells and teacher targets along with the pixels.
    """
    window_side = side * int(preprocess.input_size)
    as_window = SimpleNamespace(
        mean=preprocess.mean, std=preprocess.std, input_size=window_side, mpp=preprocess.mpp
    )
    return build_transform("eval", as_window, train=False)  # resize to s*S; the centre crop is then a no-op


class ContextWindowDataset(Dataset):
    """The context windows of one coords file.

    Item: ``(window, cell_coords, valid, teacher)`` with ``window = transform(uint8 (3, P, P))`` (the uint8
    tensor itself without a transform), ``cell_coords`` long (s*s, 2), ``valid`` bool (s*s,), and
    ``teacher`` float32 (s*s, D) from the teacher cache (zeros in invalid cells; (s*s, 0) without a cache).
    ``mpp`` overrides the slide's level-0 mpp; by default it is the coords file's ``mpp`` attribute (CLAM and
    TRIDENT coords have none, and need none). ``slide_path`` defaults to the coords' ``slide_path`` attribute
    (CLAM and TRIDENT coords have none: pass it, e.g. from `histodistill.wsi.coords.find_slide`).
    ``window_stride``: see `window_cells`. A window the slide file cannot give raises `UnreadableRegion`; with
    ``skip_unreadable`` (training, `context_windows_of_dir`) the item is the slide's next readable window's
    (`next_readable`).
    """

    def __init__(
        self,
        coords_path: str | os.PathLike,
        teacher_features: str | os.PathLike | None = None,
        side: int = 3,
        min_fraction: float = 1.0,
        slide_path: str | os.PathLike | None = None,
        transform=None,
        mpp: float | None = None,
        window_stride: int = 1,
        skip_unreadable: bool = False,
    ) -> None:
        if side < 1:
            raise UserError(f"context window side must be >= 1, got {side}")
        coords, attrs = read_coords(coords_path)
        self.coords_path = Path(coords_path)
        self.slide_id = attrs["slide_id"]
        if not (slide_path or attrs.get("slide_path")):
            raise UserError(
                f"{coords_path}: the coords do not name their slide (CLAM/TRIDENT coords); pass its "
                "file as `slide_path=...`"
            )
        self.slide_path = Path(slide_path or attrs["slide_path"])
        self.skip_unreadable = skip_unreadable
        self.side = side
        self.patch_size = int(attrs["patch_size"])
        self.target_mpp = float(attrs["target_mpp"]) if has_mpp(attrs) else None
        self.window_px = side * self.patch_size
        # The mpp the tiling used (possibly from an mpp override), as `SlideTileDataset` does: the slide's
        # metadata may lack it or disagree, and the windows must be cut on the same grid as the tiles.
        mpp = mpp if mpp is not None else attrs.get("mpp")
        self.mpp = float(mpp) if mpp is not None else None
        self.transform = transform
        stride, cell_steps = grid_geometry(attrs, coords_path)
        # CLAM/TRIDENT: a window is s cells of patch_size_level0 level-0 px each (stride * cell_steps).
        self.window_level0 = None if self.target_mpp is not None else side * stride * cell_steps
        self.anchors, self.cell_coords, self.valid = window_cells(
            coords, stride, cell_steps, side, min_fraction, window_stride, on_grid=has_mpp(attrs)
        )
        self.teacher = TeacherFeatures(teacher_features) if teacher_features is not None else None

    def __len__(self) -> int:
        return len(self.anchors)

    def read_window(self, index: int) -> torch.Tensor:
        """uint8 (3, P, P): one read of the whole window, at the target mpp (ours) or by its level-0 size."""
        slide = open_slide(self.slide_path, self.mpp)  # cached per process, so once per worker
        top_left = (int(self.cell_coords[index, 0, 0]), int(self.cell_coords[index, 0, 1]))  # cell (0, 0)
        if self.target_mpp is None:
            pixels = slide.read_box(top_left, self.window_level0, self.window_px)
        else:
            pixels = slide.read_at_mpp(top_left, self.window_px, self.target_mpp)
        # A copy: slide readers may hand back read-only buffers, which torch refuses to wrap.
        return torch.from_numpy(np.array(pixels)).permute(2, 0, 1)  # (P, P, 3) -> (3, P, P)

    def __getitem__(self, index: int):
        if self.skip_unreadable:
            return next_readable(self._item, index, len(self), self.slide_id, "context window")
        return self._item(index)

    def _item(self, index: int):
        window = self.read_window(index)
        if self.transform is not None:
            window = self.transform(window)
        cells, valid = self.cell_coords[index], self.valid[index]
        if self.teacher is None:
            teacher = torch.zeros(len(cells), 0)
        else:
            teacher = torch.from_numpy(self.teacher.lookup(cells, valid))  # (s*s, D)
        return window, torch.from_numpy(cells), torch.from_numpy(valid), teacher


def context_windows_of_dir(
    patches_dir: str | os.PathLike,
    features_dir: str | os.PathLike | None,
    side: int = 3,
    min_fraction: float = 1.0,
    transform=None,
    mpp: float | None = None,
    window_stride: int = 1,
    exclude: Collection[str] = (),
    slides_dir: str | os.PathLike | None = None,
) -> ConcatDataset:
    """Every coords file of ``patches_dir`` as one dataset, except the slide ids in ``exclude`` (held out);
    ``features_dir`` holds the teacher's ``<slide_id>.h5`` features (the cache). ``slides_dir``: the folder of
    the slides, for coords that do not name them (CLAM, TRIDENT) or whose slides moved (`find_slide`). A
    window the slide file cannot give is replaced by the slide's next readable one, with one warning per slide
    (`next_readable`). Raises `UserError` when no slide yields a window or a slide is not found."""
    tilings = {path: read_coords(path)[1] for path in visible_files(patches_dir, (".h5",))}
    tilings = {path: attrs for path, attrs in tilings.items() if attrs["slide_id"] not in set(exclude)}
    if not tilings:
        raise UserError(f"no coords files (*.h5) in {patches_dir}: run `histodistill tile` first")
    datasets = [
        ContextWindowDataset(
            path,
            None if features_dir is None else Path(features_dir) / f"{attrs['slide_id']}.h5",
            side=side,
            min_fraction=min_fraction,
            slide_path=find_slide(path, attrs, slides_dir),
            transform=transform,
            mpp=mpp,
            window_stride=window_stride,
            skip_unreadable=True,
        )
        for path, attrs in tilings.items()
    ]
    if sum(len(d) for d in datasets) == 0:
        raise UserError(
            f"no {side}x{side} context window in {patches_dir} has at least {min_fraction:.0%} tissue cells: "
            "lower `min_fraction=...` or `side=...`, or tile with a lower `min_tissue=...`"
        )
    return ConcatDataset([d for d in datasets if len(d)])
