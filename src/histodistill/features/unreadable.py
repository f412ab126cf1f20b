"""Tiles a slide file cannot give (a corrupt JPEG tile in an SVS, a damaged file), as `extract` records them.

Real archives hold slides with a few undecodable tiles. Stopping a 10,000-slide run for one would leave
the user no way forward; dropping the tile unsaid would be a silent wrong result. So `extract` leaves such
a tile out of the features file, says so in one ``warning:`` line per slide (slide, count, coords), and
records it twice: the features file's ``unreadable_tiles`` attribute (its count; the file then holds that
many rows fewer than the coords file, which the rerun check allows for) and ``unreadable_tiles.csv``
beside the features files (``slide_id,x,y``, level-0 top-left), one row per tile, every slide of the folder.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import h5py
import numpy as np
from tqdm.auto import tqdm

from histodistill.io import atomic_path

UNREADABLE_ATTR = "unreadable_tiles"
UNREADABLE_CSV = "unreadable_tiles.csv"


def unreadable_count(features_path: Path) -> int:
    """The tiles a features file leaves out as unreadable (0 when it says none or cannot be read)."""
    try:
        with h5py.File(features_path, "r") as handle:
            return int(handle.attrs.get(UNREADABLE_ATTR, 0))
    except OSError:
        return 0


def record_unreadable(features_dir: Path, slide_id: str, coords: np.ndarray, tiles: int) -> None:
    """Replace ``slide_id``'s rows of ``unreadable_tiles.csv`` with ``coords`` (U, 2) and say so on stderr."""
    path = features_dir / UNREADABLE_CSV
    rows = []
    if path.is_file():
        with path.open(newline="") as handle:
            rows = [row for row in csv.DictReader(handle) if row["slide_id"] != slide_id]
    rows += [{"slide_id": slide_id, "x": int(x), "y": int(y)} for x, y in coords]
    if not rows and not path.is_file():
        return
    with atomic_path(path) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ("slide_id", "x", "y"))
        writer.writeheader()
        writer.writerows(rows)
    if len(coords):
        shown = ", ".join(f"({x}, {y})" for x, y in coords[:5]) + (", ..." if len(coords) > 5 else "")
        # tqdm.write keeps the line off the progress bars.
        tqdm.write(f"warning: slide {slide_id}: {len(coords)} of {tiles} tiles cannot be read from the slide file "
                   f"(corrupt or damaged) and are left out of its features: {shown}; listed in {path}", file=sys.stderr)
