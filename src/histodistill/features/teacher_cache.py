"""The teacher-feature cache of MCM-KD: the frozen teacher's feature of every tile, computed once.

The cache is an ordinary features directory written by `histodistill extract` (``<slide_id>.h5``
with ``features`` (N, D) and ``coords`` (N, 2), plus ``extractor.json``). Fine-tuning looks the
teacher's targets up by tile coordinates, so the training loop never runs the teacher.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py

from histodistill.data.feature_files import EXTRACTOR_JSON, FEATURES, UNREADABLE_ATTR
from histodistill.errors import UserError
from histodistill.features.extract import extract_slides, features_folder_name
from histodistill.io import sha256_file, visible_files, write_json
from histodistill.wsi.coords import read_coords

# Our record beside extract's ``extractor.json``: the hash of the teacher's weights *file*, which the
# features files do not carry. Written last, so its presence marks a complete cache.
CACHE_RECORD = "teacher_cache.json"
NEVER_COMPLETED = "it was never completed"


def cache_features_dir(cache_root: str | os.PathLike, teacher: str, pretrained: bool = True) -> Path:
    """Where `extract` puts the teacher's features: ``<cache_root>/features_<teacher slug>``
    (`features_folder_name`)."""

    return Path(cache_root) / features_folder_name(teacher, pretrained)


def cache_key(
    patches_dir: str | os.PathLike,
    teacher: str,
    teacher_weights: str | os.PathLike | None,
    pretrained: bool = True,
) -> dict:
    """What the cached features depend on: the teacher (name, weights file hash, pretrained or random)
    and, per slide id, the tiling read from the coords attrs (`tiling_key`)."""

    slides = {}
    for path in visible_files(patches_dir, (".h5",)):
        coords, attrs = read_coords(path)
        slides[attrs["slide_id"]] = tiling_key(attrs, len(coords))
    weights_hash = sha256_file(teacher_weights) if teacher_weights else None
    key = {"teacher": str(teacher), "teacher_weights_sha256": weights_hash, "slides": slides}
    return key if pretrained else {**key, "teacher_random_init": True}


def tiling_key(attrs: dict, tiles: int) -> dict:
    """What a slide's features depend on in its tiling: target mpp (ours), or the level-0 tile side for coords
    that state no mpp (CLAM, TRIDENT); then the patch size and the tile count. ``attrs`` are a coords file's
    (`read_coords`) or a features file's (which carry the tiling's, `tiling_attrs`)."""
    if "target_mpp" in attrs:
        resolution = {"target_mpp": float(attrs["target_mpp"])}
    else:
        resolution = {"patch_size_level0": round(float(attrs.get("patch_size_level0", -1)))}
    return {**resolution, "patch_size": int(attrs.get("patch_size", -1)), "tiles": tiles}


def _cached_tiling(path: Path) -> dict | None:
    """The tiling a slide's features were computed from, from the features file's attrs."""
    if not path.is_file():
        return None
    try:
        with h5py.File(path, "r") as handle:
            # tiles the slide file could not give are left out of the file, and counted
            tiles = int(handle[FEATURES].shape[0]) + int(handle.attrs.get(UNREADABLE_ATTR, 0))
            return tiling_key(dict(handle.attrs), tiles)
    except (OSError, KeyError):  # damaged (e.g. by another tool or a failing disk): recomputed, never trusted
        return None


def stale_reasons(features_dir: str | os.PathLike, key: dict) -> list[str]:
    """Why the cache in ``features_dir`` cannot serve ``key`` (empty when it can): a different teacher
    (``extractor.json``), other weights (our record), or slides tiled differently (coords attrs vs the
    features files' attrs)."""

    features_dir = Path(features_dir)
    extractor_path, record_path = features_dir / EXTRACTOR_JSON, features_dir / CACHE_RECORD
    if not extractor_path.is_file() or not record_path.is_file():
        return [NEVER_COMPLETED]
    reasons = []
    extractor = json.loads(extractor_path.read_text()).get("extractor")
    if extractor != key["teacher"]:
        reasons.append(f"its features are from {extractor!r}, the config's teacher is {key['teacher']!r}")
    record = json.loads(record_path.read_text())
    if record.get("teacher_weights_sha256") != key["teacher_weights_sha256"]:
        reasons.append("the teacher weights file differs from the one it was computed with")
    if record.get("teacher_random_init", False) != key.get("teacher_random_init", False):
        reasons.append(
            "it was computed with "
            + ("random" if record.get("teacher_random_init") else "pretrained")
            + " teacher weights"
        )
    for slide_id, tiling in key["slides"].items():
        cached = _cached_tiling(features_dir / f"{slide_id}.h5")
        if cached != tiling:
            reasons.append(f"slide {slide_id}: cached for {cached}, tiled as {tiling}")
    return reasons


def ensure_teacher_cache(
    tiles_dir: str | os.PathLike,
    cache_root: str | os.PathLike,
    teacher: str,
    teacher_weights: str | os.PathLike | None = None,
    rebuild: bool = False,
    batch_size: int = 64,
    num_workers: int = 0,
    precision: str = "32",
    pretrained: bool = True,
    slides_dir: str | os.PathLike | None = None,
) -> Path:
    """The features directory holding the teacher's features of every tile of ``tiles_dir/patches``.

    ``tiles_dir`` is a tiling output (ours, CLAM's or TRIDENT's, holding ``patches/``); ``slides_dir`` the
    folder of its slides when the coords do not name them (CLAM, TRIDENT) or they moved. The cache is
    ``<cache_root>/features_<teacher slug>``, exactly what ``histodistill extract --model TEACHER --coords
    tiles_dir --out cache_root`` writes. A cache computed for this teacher, these weights and this tiling is
    used as is; a missing or stale one is recomputed with `histodistill.features.extract.extract_slides` when
    ``rebuild`` is True, and refused with a `UserError` naming the cache and ``data.init_args.rebuild_cache``
    otherwise.
    """
    patches_dir = Path(tiles_dir) / "patches"
    features_dir = cache_features_dir(cache_root, teacher, pretrained)
    key = cache_key(patches_dir, teacher, teacher_weights, pretrained)
    if not key["slides"]:
        raise UserError(
            f"no coords files (*.h5) in {patches_dir}: run `histodistill tile SLIDES --out {tiles_dir}` "
            "first (sample slides: `histodistill samples make-slides --out SLIDES`)"
        )
    reasons = stale_reasons(features_dir, key)
    if not reasons:
        return features_dir
    if not rebuild:
        raise UserError(
            f"the teacher cache {features_dir} is missing or stale ({'; '.join(reasons[:3])}); "
            "set data.init_args.rebuild_cache: true to (re)compute it with the teacher"
        )

    (features_dir / CACHE_RECORD).unlink(missing_ok=True)  # a half-rebuilt cache must not look complete
    # A build that was interrupted (no record yet) resumes: extract skips the slides it finished and checks
    # they are of the same weights. A stale cache is computed again from scratch.
    interrupted = reasons == [NEVER_COMPLETED]
    extract_slides(
        teacher,
        tiles_dir,
        cache_root,
        weights=teacher_weights,
        batch_size=batch_size,
        num_workers=num_workers,
        precision=precision,
        overwrite=not interrupted,
        pretrained=pretrained,
        slides_dir=slides_dir,
    )
    write_json(features_dir / CACHE_RECORD, key)
    return features_dir
