"""Coords files of `histodistill tile`, CLAM's `create_patches_fp` and TRIDENT, read into one form.

Every layout keeps dataset ``coords`` (N, 2): the level-0 top-left (x, y) of each tile. They differ
in the attributes that say how big a tile is (checked against the writers' source):

- ours: ``patch_size``, ``patch_size_level0``, ``patch_level``, ``mpp``, ``target_mpp``,
  ``level0_magnification``, ``target_magnification``, ``overlap``, ``slide_path``, ``slide_id``;
- CLAM (``WholeSlideImage.process_contour``): ``patch_size`` pixels at ``patch_level``,
  ``downsample`` (that level's (dx, dy)), ``downsampled_level_dim``, ``level_dim``, ``name``,
  ``save_path``; so ``patch_size_level0 = patch_size * downsample[0]``; no slide path;
- TRIDENT (``WSI.extract_tissue_coords``): ``patch_size``, ``patch_size_level0``,
  ``level0_magnification``, ``target_magnification``, ``overlap``, ``name``, ``savetodir``, in
  ``patches/<name>_patches.h5``; no slide path.

`read_coords` returns the attributes with at least ``patch_size``, ``patch_size_level0`` and
``slide_id``; ``slide_path``, ``mpp`` and ``target_mpp`` only when the file states them. Slides
that coords do not name (or that moved) are found by `find_slide` in a folder (``slides_dir``).
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np

from histodistill.errors import UserError
from histodistill.io import atomic_hdf5, visible_files
from histodistill.wsi.formats import SLIDE_SUFFIXES

# The tiling, as `extract` copies it onto a features file's `coords` (TRIDENT's slide encoders and
# our heatmaps read patch_size_level0 there); the first is the one every reader needs.
TILING_ATTRS = (
    "patch_size_level0",
    "patch_size",
    "patch_level",
    "target_mpp",
    "target_magnification",
    "level0_magnification",
    "mpp",
    "overlap",
)
TRIDENT_SUFFIX = "_patches"


def _plain(value):
    """h5py attribute -> Python scalar, str or list (CLAM stores tuples such as ``downsample`` as arrays)."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray):
        return value.item() if value.size == 1 else value.tolist()
    return value.item() if hasattr(value, "item") else value


def _patch_size_level0(attrs: dict) -> float | None:
    if "patch_size_level0" in attrs:
        return attrs["patch_size_level0"]
    if "downsample" in attrs:  # CLAM: patch_size pixels at patch_level, whose downsample is (dx, dy)
        downsample = attrs["downsample"]
        return attrs["patch_size"] * float(downsample[0] if isinstance(downsample, list) else downsample)
    if "level0_magnification" in attrs and "target_magnification" in attrs:
        return (
            attrs["patch_size"] * float(attrs["level0_magnification"]) / float(attrs["target_magnification"])
        )
    return None


def read_coords(h5_path: str | os.PathLike) -> tuple[np.ndarray, dict]:
    """``(coords (N, 2) int64, attrs)`` of a coords file of ours, CLAM's or TRIDENT's.

    ``attrs`` holds the file's attributes (those on ``coords`` win over the file's) plus
    ``patch_size_level0`` and ``slide_id`` (the ``name`` attribute, else the file stem without
    TRIDENT's ``_patches``). A file without ``coords`` (N, 2) or without what a tile's size follows
    from is a `UserError` naming the file and the missing attributes.
    """
    h5_path = Path(h5_path)
    try:
        with h5py.File(h5_path, "r") as h5:
            if "coords" not in h5:
                raise UserError(
                    f"{h5_path}: not a coords file: it has no `coords` dataset (found: {sorted(h5)})"
                )
            dataset = h5["coords"]
            attrs = {key: _plain(value) for key, value in h5.attrs.items()}
            attrs |= {key: _plain(value) for key, value in dataset.attrs.items()}
            coords = dataset[:]
    except OSError as error:
        raise UserError(f"{h5_path}: cannot read it as HDF5 ({error}); is it complete?") from None
    if coords.ndim != 2 or (len(coords) and coords.shape[1] != 2):
        raise UserError(f"{h5_path}: `coords` has shape {coords.shape}, expected (N, 2) level-0 (x, y)")
    missing = [] if "patch_size" in attrs else ["patch_size"]
    size0 = None if missing else _patch_size_level0(attrs)
    if size0 is None:
        missing.append(
            "patch_size_level0 (or CLAM's patch_level + downsample, or TRIDENT's "
            "level0_magnification + target_magnification)"
        )
    if missing:
        raise UserError(
            f"{h5_path}: unusable coords file: missing attribute(s) {', '.join(missing)} on `coords`; "
            "tile the slides again with `histodistill tile`"
        )
    attrs["patch_size_level0"] = max(1, round(float(size0)))
    stem = h5_path.stem.removesuffix(TRIDENT_SUFFIX) if "savetodir" in attrs else h5_path.stem
    attrs["slide_id"] = str(attrs.get("slide_id") or attrs.get("name") or stem)
    return coords.reshape(-1, 2).astype(np.int64), attrs


def write_coords(path: Path, coords: np.ndarray, attrs: dict) -> None:
    """Write ``coords`` (N, 2) int64 with ``attrs`` on the dataset (CLAM) and on the file (TRIDENT-style)."""
    with atomic_hdf5(path) as h5:
        h5.create_dataset("coords", data=coords.astype(np.int64).reshape(-1, 2))
        h5["coords"].attrs.update(attrs)  # CLAM reads the attributes from the dataset...
        h5.attrs.update(attrs)  # ...TRIDENT-style readers from the file; both are cheap


def tiling_attrs(attrs: dict) -> dict:
    """The `TILING_ATTRS` a coords file states, in that order, to copy onto a features file's ``coords``."""
    return {key: attrs[key] for key in TILING_ATTRS if attrs.get(key) is not None}


def coords_files(source: str | os.PathLike) -> list[Path]:
    """The coords files of a tiling output: ``source/patches/*.h5``, or ``source/*.h5`` when ``source``
    is that ``patches/`` folder itself (ours, CLAM's or TRIDENT's). Hidden names are temporary files
    of a tiling still running. Raises `UserError` when there are none."""
    source = Path(source)
    folder = source / "patches" if (source / "patches").is_dir() else source
    files = visible_files(folder, (".h5",))
    if not files:
        raise UserError(
            f"`coords_dir={source}`: no coords files in {folder} or {source / 'patches'}; run "
            f"`histodistill tile ... --out {source}` first, or pass a CLAM/TRIDENT patches/ folder"
        )
    return files


def find_slide(
    coords_path: Path, attrs: dict, slides_dir: str | os.PathLike | None = None, slide_ext: str | None = None
) -> Path:
    """The slide of a coords file: ``<slides_dir>/<slide_id><ext>`` when ``slides_dir`` is given
    (any slide suffix when ``slide_ext`` is None), else the file's ``slide_path``.

    Raises `UserError` naming the coords file and ``slides_dir`` when the slide is not found.
    """
    slide_id = attrs["slide_id"]
    if slides_dir is not None:
        folder = Path(slides_dir)
        if not folder.is_dir():
            raise UserError(f"`slides_dir={folder}`: not a folder")
        suffixes = (
            [slide_ext if slide_ext.startswith(".") else f".{slide_ext}"] if slide_ext else SLIDE_SUFFIXES
        )
        found = [
            folder / f"{slide_id}{suffix}"
            for suffix in suffixes
            if (folder / f"{slide_id}{suffix}").is_file()
        ]
        if not found:
            looked = (
                f"{slide_id}{suffixes[0]}"
                if slide_ext
                else f"{slide_id}.<{'|'.join(s[1:] for s in suffixes)}>"
            )
            raise UserError(
                f"{coords_path}: no slide {looked} in `slides_dir={folder}`"
                + ("" if slide_ext else "; pass `slide_ext=...` if its suffix is another")
            )
        return found[0]
    if not attrs.get("slide_path"):
        raise UserError(
            f"{coords_path}: the coords do not name their slide (CLAM and TRIDENT coords do not); "
            "pass `slides_dir=DIR`, the folder holding <slide_id>.<ext>"
        )
    path = Path(attrs["slide_path"])
    if not path.is_file():
        raise UserError(
            f"{coords_path}: its slide {path} no longer exists; pass `slides_dir=DIR`, the folder "
            "the slides are in now"
        )
    return path
