"""Teacher features by tile coordinates: MCM-KD's targets, read from a features file of the teacher cache.

The cache itself (which teacher, when it is stale, how it is built) lives in
`histodistill.features.teacher_cache`; this reader only needs the file, so training data does not
depend on extraction.
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np

from histodistill.data.feature_files import COORDS, FEATURES, UNREADABLE_ATTR
from histodistill.errors import UserError
from histodistill.wsi.slide import UnreadableRegion


class TeacherFeatures:
    """Coordinate lookup in one slide's features file. The file is opened on first use, so each
    DataLoader worker gets its own handle (h5py handles must not cross a fork)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._features: h5py.Dataset | None = None
        self._row: dict[tuple[int, int], int] = {}
        self._attrs: dict = {}

    def _open(self) -> h5py.Dataset:
        if self._features is None:
            if not self.path.is_file():
                raise UserError(f"teacher cache file {self.path} is missing: set data.rebuild_cache: true")
            handle = h5py.File(self.path, "r")
            self._row = {(int(x), int(y)): i for i, (x, y) in enumerate(handle[COORDS][:])}
            self._features = handle[FEATURES]
            self._attrs = {**handle[COORDS].attrs, **handle.attrs}
        return self._features

    @property
    def dim(self) -> int:
        return int(self._open().shape[1])

    def lookup(self, cell_coords: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """(S, 2) cell top-lefts + (S,) valid -> (S, D) float32 teacher features, zeros where not valid.

        A valid cell without a feature is `UnreadableRegion` when the file records tiles its slide file could
        not give (`extract` left them out), else a `UserError`: the cache was computed from another tiling."""
        features = self._open()
        out = np.zeros((len(cell_coords), features.shape[1]), np.float32)
        wanted = [
            (k, (int(x), int(y))) for k, ((x, y), ok) in enumerate(zip(cell_coords, valid, strict=True)) if ok
        ]
        missing = [xy for _, xy in wanted if xy not in self._row]
        if missing and self._attrs.get(UNREADABLE_ATTR, 0):
            side = int(round(float(self._attrs.get("patch_size_level0", 0))))
            raise UnreadableRegion(
                Path(str(self._attrs.get("slide_path", self.path))),
                missing[0],
                0,
                (side, side),
                f"left out of the teacher cache {self.path} as unreadable",
            )
        if missing:
            raise UserError(
                f"teacher cache {self.path} has no feature for tile(s) {missing[:3]}: it was computed from a "
                "different tiling; set data.rebuild_cache: true to recompute it"
            )
        rows = np.array([self._row[xy] for _, xy in wanted], dtype=np.int64)
        order = np.argsort(rows)  # h5py reads a list of rows only in increasing order
        values = features[rows[order]] if len(rows) else np.zeros((0, features.shape[1]), np.float32)
        out[[wanted[k][0] for k in order]] = values
        return out


def feature_statistics(paths: list[Path]) -> tuple[np.ndarray, np.ndarray, int]:
    """Per-dimension mean and population standard deviation (D,) of the ``features`` rows of every
    features file in ``paths`` (all of a teacher cache's tiles), and the number of rows. Accumulated in
    float64, one file at a time. Raises UserError when there are no rows."""
    count, total, squares = 0, None, None
    for path in paths:
        with h5py.File(path, "r") as handle:
            rows = handle["features"][:].astype(np.float64)  # (N, D)
        if total is None:
            total, squares = np.zeros(rows.shape[1]), np.zeros(rows.shape[1])
        count += len(rows)
        total += rows.sum(axis=0)
        squares += (rows**2).sum(axis=0)
    if not count:
        raise UserError(
            f"no teacher features to compute target statistics from in {[str(p) for p in paths][:3]}"
        )
    mean = total / count
    return mean, np.sqrt(np.maximum(squares / count - mean**2, 0.0)), count
