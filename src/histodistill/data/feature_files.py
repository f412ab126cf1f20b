"""The features file format's one owner: its names, writing, reading and checks; and one reader for folders of
per-slide tile features, ours, CLAM's and TRIDENT's, checked up front.

Our files (`write_slide_features`): ``<out>/features_<model>/<slide_id>.h5`` with datasets ``features`` (N, D)
float32 and ``coords`` (N, 2) int64, level-0 top-left (x, y), the tiling's attributes on ``coords`` (where
TRIDENT's slide encoders read them) and the slide's on the file; ``extractor.json`` beside them. Patch
folders: one ``features.h5`` (`write_patch_features`). Every write is atomic (`histodistill.io.atomic_hdf5`).

Layouts found from the folder a user passes (``features``):

- histodistill / TRIDENT: ``<dir>/<slide_id>.h5`` with datasets ``features`` (N, D) and ``coords`` (N, 2),
  level-0 top-left (x, y). TRIDENT writes ``<job_dir>/<mag>x_<px>px_<overlap>px_overlap/features_<encoder>/``,
  we write ``<out>/features_<model>/``: a folder holding exactly one ``features_*`` subfolder (directly or
  one level down) is read from that subfolder. ``.pt`` files (TRIDENT's ``saveas='pt'``) are tensors (N, D).
- CLAM: ``<feat_dir>/h5_files/<slide_id>.h5`` (``features`` float32, ``coords`` int32, no attributes) and
  ``<feat_dir>/pt_files/<slide_id>.pt`` (a float tensor (N, D), no coords). ``h5_files`` is preferred
  because it has the coords that attention files and heatmaps need. CLAM appends to the ``.h5`` batch
  by batch and writes the ``.pt`` last, so an ``.h5`` without its ``.pt`` is a slide CLAM did not finish.

Every problem a run would meet later is found before any work starts and reported in one `UserError` that
names each file: unreadable or truncated files, missing datasets, ``features``/``coords`` row counts that
differ, a feature dimension that differs from the others, non-finite rows. Hidden and temporary files (a
killed run's ``.s1.k3j2h1.tmp.h5``) are never read (`histodistill.io.visible_files`).

Before a rerun of `extract` skips a slide (`is_finished`), its file must open and have as many ``features``
rows as its coords file has tiles, in the extractor's dimension; anything else (a file cut short by a full
disk, one copied half-way, one left by an older tiling) is redone, with a line saying why. Only shapes are
read, so a rerun over thousands of slides starts at once. A model that gives non-finite features stops the run
before they are written (`require_finite`): writing them would break every later step.

Unreadable tiles (a corrupt JPEG tile in an SVS, a damaged file). Real archives hold slides with a few
undecodable tiles. Stopping a 10,000-slide run for one would leave the user no way forward; dropping the tile
unsaid would be a silent wrong result. So `extract` leaves such a tile out of the features file, says so in
one ``warning:`` line per slide (slide, count, coords), and records it twice: the features file's
``unreadable_tiles`` attribute (its count; the file then holds that many rows fewer than the coords file,
which the rerun check allows for) and ``unreadable_tiles.csv`` beside the features files (``slide_id,x,y``,
level-0 top-left), one row per tile, every slide of the folder (`record_unreadable`).
"""

from __future__ import annotations

import csv
import os
import pickle
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from tqdm.auto import tqdm

from histodistill.errors import UserError
from histodistill.io import atomic_hdf5, atomic_path, visible_files

FEATURES = "features"  # dataset (N, D) float32
COORDS = "coords"  # dataset (N, 2) int64, level-0 top-left (x, y); the tiling's attributes are on it
EXTRACTOR_JSON = "extractor.json"  # beside the features files: which network, weights and preprocessing
PATCH_FEATURES = (
    "features.h5"  # an image folder's features: FEATURES, ``labels``, ``paths``, attr ``classes``
)
# A features file's count of the tiles of its coords file the slide file could not give (module docstring).
UNREADABLE_ATTR = "unreadable_tiles"
UNREADABLE_CSV = "unreadable_tiles.csv"  # slide_id,x,y of every tile left out as unreadable, beside the files
FEATURE_SUFFIXES = (".h5", ".pt")
SHOWN = 5  # names listed in one message before "and N more"


@dataclass(frozen=True)
class FeatureFolder:
    """Where a folder's feature files are: ``files`` maps slide id -> file."""

    given: Path  # what the user passed
    directory: Path  # where the files are
    layout: str  # "histodistill/TRIDENT h5", "CLAM h5_files", "CLAM pt_files", "pt"
    files: dict[str, Path]
    unfinished: frozenset[str] = frozenset()  # CLAM h5_files without their pt_files counterpart

    def describe(self) -> str:
        where = "" if self.directory == self.given else f" (read from {self.directory})"
        return f"{self.given}{where}"


@dataclass
class SlideFeatures:
    """One slide: ``features`` (N, D) float32, ``coords`` (N, 2) int64 or None (CLAM pt_files), attrs."""

    features: np.ndarray
    coords: np.ndarray | None
    attrs: dict = field(default_factory=dict)

    @property
    def n_tiles(self) -> int:
        return int(self.features.shape[0])


def shown(names: Iterable[str]) -> str:
    """``a, b, c, d, e and 3 more``: lists in one-line messages stay readable."""
    names = list(names)
    extra = len(names) - SHOWN
    return ", ".join(names[:SHOWN]) + (f" and {extra} more" if extra > 0 else "")


def _files_in(directory: Path) -> tuple[str, dict[str, Path]] | None:
    h5 = visible_files(directory, (".h5",))
    if h5:
        return "histodistill/TRIDENT h5", {p.stem: p for p in h5}
    pt = visible_files(directory, (".pt",))
    if pt:
        return "pt", {p.stem: p for p in pt}
    return None


def open_feature_folder(path: str | os.PathLike) -> FeatureFolder:
    """Find the feature files under ``path`` (see the module docstring for the layouts)."""
    given = Path(path)
    if not given.is_dir():
        what = "a file" if given.exists() else "missing"
        raise UserError(
            f"`features={given}` is {what}, not a folder: pass the folder of <slide_id>.h5 files "
            "that "
            "`histodistill extract` wrote (or CLAM's feat_dir, or TRIDENT's features_<encoder>/)"
        )
    for sub, layout in (("h5_files", "CLAM h5_files"), ("pt_files", "CLAM pt_files")):
        found = _files_in(given / sub)
        if found:
            files, unfinished = found[1], frozenset()
            finished = {p.stem for p in visible_files(given / "pt_files", (".pt",))}
            if sub == "h5_files" and finished:
                unfinished = frozenset(files) - finished
                files = {s: p for s, p in files.items() if s in finished}
            return FeatureFolder(given, given / sub, layout, files, unfinished)
    found = _files_in(given)
    if found:
        return FeatureFolder(given, given, *found)
    candidates = sorted(
        d for d in (*given.glob("features_*"), *given.glob("*/features_*")) if d.is_dir() and _files_in(d)
    )
    if len(candidates) == 1:
        return FeatureFolder(given, candidates[0], *_files_in(candidates[0]))
    if candidates:
        raise UserError(
            f"`features={given}` holds {len(candidates)} feature folders "
            f"({shown(str(c) for c in candidates)}): "
            "pass the one you want"
        )
    raise UserError(
        f"`features={given}` has no feature files: expected <slide_id>.h5 (histodistill extract, "
        "TRIDENT features_<encoder>/) or CLAM's h5_files/ or pt_files/"
    )


def read_slide_features(path: str | os.PathLike) -> SlideFeatures:
    """Read one ``.h5`` (``features`` + ``coords``) or ``.pt`` (a tensor (N, D)) file.

    Raises `UserError` naming the file when it cannot be read, lacks a dataset, or its shapes disagree;
    it does not check values (see `problems_of`).
    """
    path = Path(path)
    if path.suffix.lower() == ".pt":
        return _read_pt(path)
    try:
        with h5py.File(path, "r") as handle:
            if FEATURES not in handle:
                raise UserError(
                    f"{path} has no `features` dataset (it has {sorted(handle)}): not a features file"
                )
            features = np.asarray(handle[FEATURES][:], dtype=np.float32)
            coords = np.asarray(handle[COORDS][:]).astype(np.int64) if COORDS in handle else None
            attrs = dict(handle.attrs) | (dict(handle[COORDS].attrs) if COORDS in handle else {})
    except (OSError, KeyError, ValueError, TypeError) as error:
        # h5py raises OSError for truncated or non-HDF5 files, KeyError/ValueError for damaged objects.
        raise UserError(
            f"{path} cannot be read ({type(error).__name__}: {error}); it is truncated or not a "
            "features file: delete it and run `histodistill extract` again (it redoes missing files)"
        ) from None
    return _checked(path, SlideFeatures(features, coords, attrs))


def _read_pt(path: Path) -> SlideFeatures:
    try:
        # weights_only: a .pt is a pickle, and only plain tensors are accepted from it.
        value = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, ValueError) as error:
        raise UserError(
            f"{path} cannot be read as a tensor ({type(error).__name__}: {str(error).splitlines()[0]}); "
            "it is truncated or not a features file: recreate it"
        ) from None
    if not isinstance(value, torch.Tensor):
        raise UserError(
            f"{path} holds a {type(value).__name__}, not a features tensor (N, D) as CLAM's pt_files do"
        )
    return _checked(path, SlideFeatures(value.float().numpy(), None, {}))


def _checked(path: Path, slide: SlideFeatures) -> SlideFeatures:
    features, coords = slide.features, slide.coords
    if features.ndim != 2:
        raise UserError(f"{path}: `features` has shape {features.shape}; expected (tiles, dim)")
    if coords is not None:
        if coords.ndim != 2 or coords.shape[1] != 2:
            raise UserError(f"{path}: `coords` has shape {coords.shape}; expected (tiles, 2)")
        if len(coords) != len(features):
            raise UserError(
                f"{path}: {len(features)} feature rows but {len(coords)} coords rows; the file is "
                "incomplete: delete it and extract that slide again"
            )
    return slide


def non_finite_rows(features: np.ndarray) -> int:
    """How many rows of (N, D) ``features`` hold a NaN or an infinity."""
    return int((~np.isfinite(features)).any(axis=1).sum()) if features.size else 0


def problems_of(path: Path, rows: int | None = None, dim: int | None = None) -> str | None:
    """What is wrong with one ``.h5`` features file, or None: it cannot be opened (HDF5 checks the file
    length on open, so a truncated file fails here), lacks ``features``, its ``features``/``coords``
    rows differ, or it differs from ``rows`` / ``dim`` when given.

    Reads shapes only, never the feature values, so verifying a cohort's folder before a rerun costs
    milliseconds per file; values are checked where they are written (`extract` refuses NaN/inf) and
    where they are used (`load_slides`).
    """
    try:
        with h5py.File(path, "r") as handle:
            if FEATURES not in handle:
                return f"{path} has no `features` dataset"
            shape = handle[FEATURES].shape
            coords_rows = handle[COORDS].shape[0] if COORDS in handle else shape[0]
    except (OSError, KeyError, ValueError) as error:
        return f"{path} cannot be read ({type(error).__name__}: {error})"
    if len(shape) != 2 or coords_rows != shape[0]:
        return f"{path} has features {shape} and {coords_rows} coords rows"
    if rows is not None and shape[0] != rows:
        return f"{path} has {shape[0]} rows but its coords file has {rows}"
    if dim is not None and shape[0] and shape[1] != dim:
        return f"{path} has dimension {shape[1]}, the extractor gives {dim}"
    return None


def write_slide_features(
    path: Path,
    features: np.ndarray,
    coords: np.ndarray,
    attrs: dict[str, Any],
    coords_attrs: dict[str, Any] | None = None,
) -> None:
    """``features`` (N, D) float32 and ``coords`` (N, 2) int64, written atomically; ``coords_attrs`` (the
    tiling: patch_size_level0, ...) go on the ``coords`` dataset, where TRIDENT's slide encoders read them."""
    with atomic_hdf5(path) as handle:
        handle.create_dataset(FEATURES, data=features.astype(np.float32))
        # track_order keeps the attributes in the order given, patch_size_level0 first.
        handle.create_dataset(COORDS, data=coords.astype(np.int64), track_order=True)
        handle[COORDS].attrs.update(coords_attrs or {})
        for key, value in attrs.items():
            handle.attrs[key] = value


def write_patch_features(
    path: Path, features: np.ndarray, labels: np.ndarray, paths: list[str], attrs: dict[str, Any]
) -> None:
    """An image folder's ``features`` (N, D) float32, ``labels`` (N,) int64 and ``paths`` (N,) (relative to
    its root), written atomically with ``attrs`` (``classes``, ``extractor``, ``weights_sha256``) on the
    file."""
    with atomic_hdf5(path) as handle:
        handle.create_dataset(FEATURES, data=features.astype(np.float32))
        handle.create_dataset("labels", data=labels.astype(np.int64))
        handle.create_dataset("paths", data=np.array(paths, dtype=object), dtype=h5py.string_dtype())
        for key, value in attrs.items():
            handle.attrs[key] = value


def coords_rows(coords_path: Path) -> int | None:
    """Tiles in a coords file (None when it cannot be read: the tiling step reports that itself)."""
    try:
        with h5py.File(coords_path, "r") as handle:
            return int(handle[COORDS].shape[0])
    except (OSError, KeyError):
        return None


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
        listed = ", ".join(f"({x}, {y})" for x, y in coords[:5]) + (", ..." if len(coords) > 5 else "")
        # tqdm.write keeps the line off the progress bars.
        tqdm.write(
            f"warning: slide {slide_id}: {len(coords)} of {tiles} tiles cannot be read from the slide file "
            f"(corrupt or damaged) and are left out of its features: {listed}; listed in {path}",
            file=sys.stderr,
        )


def is_finished(target: Path, coords_path: Path, dim: int) -> bool:
    """True when ``target`` is a complete features file for ``coords_path``; prints why it is redone
    otherwise."""
    if not target.exists():
        return False
    rows = coords_rows(coords_path)
    if rows is not None:  # tiles the slide file could not give are left out, and counted (`unreadable_count`)
        rows -= unreadable_count(target)
    problem = problems_of(target, rows=rows, dim=dim)
    if problem is not None:
        print(f"redoing {target.name}: {problem}")
    return problem is None


def require_finite(features: np.ndarray, source: str, model: str) -> None:
    """Stop with a `UserError` naming ``source`` (``slide s1``) when ``features`` (N, D) hold a NaN or an
    infinity."""
    if bad := non_finite_rows(features):
        raise UserError(
            f"`model={model}` gave non-finite features (NaN or inf) for {bad} of {len(features)} images of "
            f"{source}; nothing was written for it. Check the weights (a diverged checkpoint gives NaN), or "
            "try `precision='32'`"
        )


def load_slides(folder: FeatureFolder, slide_ids: Iterable[str]) -> dict[str, SlideFeatures]:
    """Every listed slide's features, all read and checked before anything trains.

    One `UserError` lists every problem found: slides without a file, files that cannot be read,
    dimensions that differ from the majority, non-finite rows (with their count per file).
    Empty slides (0 tiles) are returned as they are; see `empty_slides`.
    """
    slide_ids = list(dict.fromkeys(slide_ids))
    if cut := [s for s in slide_ids if s in folder.unfinished]:
        raise UserError(
            f"CLAM did not finish {len(cut)} slide(s) in {folder.describe()}: {shown(cut)} have an .h5 "
            "but no pt_files/<slide_id>.pt; run CLAM's extract_features_fp.py again for them"
        )
    missing = [s for s in slide_ids if s not in folder.files]
    if missing:
        raise UserError(
            f"no features file in {folder.describe()} for {len(missing)} slide(s) {shown(missing)}: run "
            "`histodistill extract` for them or remove them from the labels CSV"
        )
    loaded, unreadable = {}, []
    for slide_id in slide_ids:
        try:
            loaded[slide_id] = read_slide_features(folder.files[slide_id])
        except UserError as error:
            unreadable.append(str(error))
    if unreadable:
        raise UserError(
            f"{len(unreadable)} features file(s) cannot be used: "
            + "; ".join(unreadable[:SHOWN])
            + (f"; and {len(unreadable) - SHOWN} more" if len(unreadable) > SHOWN else "")
        )
    dims = {s: f.features.shape[1] for s, f in loaded.items() if f.n_tiles}
    if len(set(dims.values())) > 1:
        common = max(set(dims.values()), key=list(dims.values()).count)
        odd = [f"{folder.files[s].name} ({d})" for s, d in dims.items() if d != common]
        raise UserError(
            f"features in {folder.describe()} have different dimensions: most are {common}, but "
            f"{shown(odd)}: they come from another extractor; extract them again with the same "
            "model"
        )
    bad = {s: n for s, f in loaded.items() if (n := non_finite_rows(f.features))}
    if bad:
        listed = [f"{folder.files[s].name} ({n} of {loaded[s].n_tiles} rows)" for s, n in bad.items()]
        raise UserError(
            f"non-finite features (NaN or inf) in {len(bad)} file(s) of {folder.describe()}: "
            f"{shown(listed)}; extract them again (`histodistill extract --overwrite`) or remove those "
            "slides from the labels CSV"
        )
    return loaded


def feature_dim(slides: dict[str, SlideFeatures]) -> int:
    """The feature dimension D shared by the slides (the width of an empty (0, D) array counts too)."""
    return next(
        (f.features.shape[1] for f in slides.values() if f.n_tiles),
        next(iter(slides.values())).features.shape[1],
    )
