"""Tiles read lazily from slides at the resolution their coords file was made for.

A dataset holds only paths, numbers and the coords array, so it pickles cheaply into DataLoader
workers; each worker opens a slide on its first tile through `open_slide`'s per-process cache
and keeps it open for the rest of the epoch.
"""

from __future__ import annotations

import bisect
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

import torch
from torch.utils.data import ConcatDataset, Dataset
from tqdm.auto import tqdm

from histodistill.errors import UserError
from histodistill.io import visible_files
from histodistill.wsi.coords import read_coords
from histodistill.wsi.slide import UnreadableRegion, open_slide


class SlideTileDataset(Dataset):
    """Tiles of one slide: ``(transform(uint8 (3, H, W)), coords long (2,))`` per coords row.

    ``slide_path`` defaults to the ``slide_path`` attribute of the coords file; ``mpp`` overrides
    the slide's level-0 mpp, which otherwise is the one the tiling used (the ``mpp`` attribute),
    so tiles come out exactly as tiled even when that came from `tile_slide`'s ``mpp_override``. Coords
    of CLAM or TRIDENT (no mpp, no slide path) are read as ``patch_size_level0`` level-0 pixels resized to
    ``patch_size``, the field of view those tools cut.

    A tile the slide file cannot give (a corrupt JPEG tile) raises `UnreadableRegion`; with
    ``mark_unreadable`` (`extract`) its item is instead a stand-in image with coords ``(x, y, 0)``, readable
    tiles coming with ``(x, y, 1)``, so the reader leaves it out, names it and records it; with
    ``skip_unreadable`` (training, `SlideTilesDataset`) the item is the next readable tile's
    (`next_readable`).
    """

    def __init__(
        self,
        coords_path: str | os.PathLike,
        slide_path: str | os.PathLike | None = None,
        transform: Callable | None = None,
        mpp: float | None = None,
        mark_unreadable: bool = False,
        skip_unreadable: bool = False,
    ):
        self.coords_path = Path(coords_path)
        self.mark_unreadable, self.skip_unreadable = mark_unreadable, skip_unreadable
        self.coords, attrs = read_coords(self.coords_path)  # (N, 2) int64
        self.slide_id = str(attrs.get("slide_id", self.coords_path.stem))
        self.attrs = attrs
        if not (slide_path or attrs.get("slide_path")):
            raise UserError(
                f"{self.coords_path}: the coords do not name their slide (CLAM/TRIDENT coords); pass "
                "`slide_path=...` (`slide_paths=...`, {slide_id: path}, for SlideTilesDataset)"
            )
        self.slide_path = Path(slide_path or attrs["slide_path"])
        if not self.slide_path.is_file():
            raise UserError(
                f"{self.coords_path}: its slide {self.slide_path} does not exist; pass the slide's current "
                "location (`slide_path=...`, or `slide_paths=...`, {slide_id: path}, for SlideTilesDataset)"
            )
        self.patch_size = int(attrs["patch_size"])
        self.target_mpp = float(attrs["target_mpp"]) if "target_mpp" in attrs else None
        mpp = mpp if mpp is not None else attrs.get("mpp")
        self.mpp = float(mpp) if mpp is not None else None
        # Level-0 side of a tile: exact from the mpps when the file has them (no rounding), else as stated.
        exact = self.target_mpp is not None and self.mpp is not None
        self.patch_size_level0 = (
            self.patch_size * self.target_mpp / self.mpp if exact else float(attrs["patch_size_level0"])
        )
        self.transform = transform
        self._slide = None  # opened lazily in the process that reads, never pickled (__getstate__)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_slide": None}

    def __len__(self) -> int:
        return len(self.coords)

    def __getitem__(self, index: int):
        if self.skip_unreadable:
            return next_readable(self._item, index, len(self), self.slide_id, "tile")
        return self._item(index)

    def _item(self, index: int):
        x, y = (int(v) for v in self.coords[index])
        if self._slide is None:
            self._slide = open_slide(self.slide_path, mpp=self.mpp)
        try:
            tile = self._slide.read_box((x, y), self.patch_size_level0, self.patch_size)  # (H, W, 3) uint8
        except UnreadableRegion:
            if not self.mark_unreadable:
                raise
            return marked_unreadable(
                torch.zeros((3, self.patch_size, self.patch_size), dtype=torch.uint8), self.transform, x, y
            )
        # The copy makes the (possibly read-only, Pillow-owned) pixels a writable (3, H, W) array.
        image = torch.from_numpy(tile.transpose(2, 0, 1).copy())  # (3, H, W)
        if self.transform is not None:
            image = self.transform(image)
        if self.mark_unreadable:
            return image, torch.tensor((x, y, 1), dtype=torch.long)
        return image, torch.tensor((x, y), dtype=torch.long)


def marked_unreadable(image: torch.Tensor, transform: Callable | None, x: int, y: int):
    """The item of a tile whose pixels cannot be read, in ``mark_unreadable`` mode: a stand-in ``image``
    (never used: the reader drops the row) and coords ``(x, y, 0)``; readable tiles come with ``(x, y,
    1)``."""
    return (transform(image) if transform is not None else image), torch.tensor((x, y, 0), dtype=torch.long)


Item = TypeVar("Item")
# Slides whose unreadable tiles this process has named: one warning per slide (and per DataLoader worker).
_NAMED: set[str] = set()


def next_readable(item: Callable[[int], Item], index: int, size: int, slide_id: str, what: str) -> Item:
    """``item(index)`` or, when the slide file cannot give its pixels (`UnreadableRegion`), the item of the
    next index of the same slide that it can (wrapping around), so a training batch keeps its size and holds
    no made-up pixels. The first unreadable ``what`` (tile, context window) of each slide is named in one
    ``warning:`` line per process; a slide none of whose ``size`` items can be read is a `UserError`."""
    for step in range(size):
        try:
            return item((index + step) % size)
        except UnreadableRegion as damage:
            if slide_id not in _NAMED:
                _NAMED.add(slide_id)
                x, y = damage.location
                tqdm.write(
                    f"warning: slide {slide_id}: a {what} at level-0 ({x}, {y}) cannot be read from "
                    f"{damage.path} ({damage.reason}); training uses the slide's next readable {what} in "
                    f"its place and names no further ones of this slide (`histodistill extract` lists them "
                    "all in unreadable_tiles.csv)",
                    file=sys.stderr,
                )
    raise UserError(
        f"slide {slide_id}: none of its {size} {what}s can be read from the slide file (corrupt or "
        "damaged); leave it out of the training data or restore the file"
    )


class SlideTilesDataset(ConcatDataset):
    """Every tile of a tiling output: the concatenation of one `SlideTileDataset` per coords file.

    ``patches_dir`` is ``<out>/patches`` of `histodistill tile`. ``slide_paths`` maps slide ids to
    slide files for slides that moved since tiling. ``.datasets[i].slide_id`` names each part;
    `slide_index` finds which slide a global index falls in. A tile the slide file cannot give is replaced by
    the slide's next readable tile, with one warning per slide (`next_readable`).
    """

    def __init__(
        self,
        patches_dir: str | os.PathLike,
        transform: Callable | None = None,
        slide_paths: Mapping[str, str | os.PathLike] | None = None,
    ):
        patches_dir = Path(patches_dir)
        # Leaves out the unfinished temporary files of a running `tile` (`histodistill.io.visible_files`).
        files = visible_files(patches_dir, (".h5",))
        if not files:
            raise UserError(
                f"{patches_dir}: no coords files (*.h5); run `histodistill tile ... --out DIR` "
                "and pass DIR/patches"
            )
        slide_paths = slide_paths or {}
        super().__init__(
            [
                SlideTileDataset(path, slide_paths.get(path.stem), transform, skip_unreadable=True)
                for path in files
            ]
        )

    @property
    def transform(self) -> Callable | None:
        return self.datasets[0].transform

    @transform.setter
    def transform(self, transform: Callable | None) -> None:
        # PatchDataModule sets the transform after construction; every slide's part shares it.
        for part in self.datasets:
            part.transform = transform

    def slide_index(self, index: int) -> int:
        """Index into ``self.datasets`` of the slide that global tile ``index`` belongs to."""
        return bisect.bisect_right(self.cumulative_sizes, index)
