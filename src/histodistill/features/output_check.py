"""Checks on the slide features files `extract_slides` writes: before a rerun skips one, and before one is written.

A file that exists is finished only if it opens and has as many ``features`` rows as its coords file
has tiles, in the extractor's dimension; anything else (a file cut short by a full disk, one copied
half-way, one left by an older tiling) is redone, with a line saying why. Only shapes are read, so a
rerun over thousands of slides starts at once. A model that gives non-finite features stops the run
before they are written: writing them would break every later step.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from histodistill.data.feature_files import non_finite_rows, problems_of
from histodistill.errors import UserError
from histodistill.features.unreadable import unreadable_count


def coords_rows(coords_path: Path) -> int | None:
    """Tiles in a coords file (None when it cannot be read: the tiling step reports that itself)."""
    try:
        with h5py.File(coords_path, "r") as handle:
            return int(handle["coords"].shape[0])
    except (OSError, KeyError):
        return None


def is_finished(target: Path, coords_path: Path, dim: int) -> bool:
    """True when ``target`` is a complete features file for ``coords_path``; prints why it is redone otherwise."""
    if not target.exists():
        return False
    rows = coords_rows(coords_path)
    if rows is not None:  # tiles the slide file could not give are left out, and counted (`features.unreadable`)
        rows -= unreadable_count(target)
    problem = problems_of(target, rows=rows, dim=dim)
    if problem is not None:
        print(f"redoing {target.name}: {problem}")
    return problem is None


def require_finite(features: np.ndarray, source: str, model: str) -> None:
    """Stop with a `UserError` naming ``source`` (``slide s1``) when ``features`` (N, D) hold a NaN or an infinity."""
    if bad := non_finite_rows(features):
        raise UserError(
            f"--model {model} gave non-finite features (NaN or inf) for {bad} of {len(features)} images of "
            f"{source}; nothing was written for it. Check the weights (a diverged checkpoint gives NaN), or "
            "try --precision 32"
        )
