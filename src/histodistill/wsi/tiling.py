"""Grid tiling of one slide at a target resolution: coords HDF5, QC picture and status JSON.

Arithmetic (all positions are top-left (x, y) at level 0):

- ``scale = target_mpp / slide_mpp`` level-0 pixels per target pixel;
- ``patch_size_level0 = round(patch_size * scale)``, stride ``(patch_size - overlap) * scale``;
- column k sits at ``round(k * stride)``; only tiles that fit entirely inside the slide are kept,
  so every tile is real pixels (no padding) and rounding never drifts across a large slide;
- a tile is kept when the tissue mask covers at least ``min_tissue`` of its footprint; the mask is
  computed on the pyramid level closest to the resolution it needs (`mask_mpp_for`).

Outputs of ``tile_slide(path, out)``: ``out/patches/<id>.h5`` (CLAM/TRIDENT layout),
``out/qc/<id>.png`` and ``out/status/<id>.json``, each written atomically; the status file is
written last and marks the slide as done. A slide without a single tile gets no coords file and
status ``empty`` with a message that says why, names the QC image and the option to change.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw

from histodistill.errors import ConfigError, UserError
from histodistill.io import atomic_path, is_disk_full, write_json
from histodistill.wsi.coords import write_coords
from histodistill.wsi.slide import LEVEL_MPP_TOLERANCE, Slide, open_slide
from histodistill.wsi.tissue import TissueConfig, lacks_colour, mask_mpp_for, tissue_mask

__all__ = ["TileResult", "grid_coords", "tile_slide", "tissue_fractions"]

# mpp x magnification for slides that do not state their objective power: 20x = 0.5 mpp,
# 40x = 0.25 mpp (the usual scanner convention).
MPP_TIMES_MAGNIFICATION = 10.0
QC_MIN_SIDE = 1024  # a QC picture smaller than this is read again, finer, so its tile boxes can be seen


@dataclass(frozen=True)
class TileResult:
    """What happened to one slide. ``status`` is ``ok``, ``empty`` (no tile; ``message`` says why),
    ``skipped`` (already done; ``message`` repeats an earlier run's) or ``failed``. ``message`` of an
    ``ok`` slide holds its warnings, if any."""

    slide_id: str
    slide_path: str
    status: str
    n_tiles: int
    seconds: float
    message: str = ""


@dataclass(frozen=True)
class OutputPaths:
    coords: Path
    qc: Path
    status: Path

    @classmethod
    def for_slide(cls, out_dir: str | os.PathLike, slide_id: str) -> OutputPaths:
        out = Path(out_dir)
        return cls(
            out / "patches" / f"{slide_id}.h5",
            out / "qc" / f"{slide_id}.png",
            out / "status" / f"{slide_id}.json",
        )


def magnification_to_mpp(slide: Slide, magnification: float) -> float:
    """Target mpp of ``magnification``: from the slide's own objective power and mpp when it states
    them (a 40x scanner at 0.23 mpp gives 20x = 0.46 mpp), else 20x = 0.5 mpp."""
    if magnification <= 0:
        raise ConfigError(f"`magnification={magnification}`: must be positive")
    if slide.objective_power is not None:
        return slide.mpp * slide.objective_power / magnification
    return MPP_TIMES_MAGNIFICATION / magnification


def grid_coords(dimensions: tuple[int, int], patch_size: int, overlap: int, scale: float) -> np.ndarray:
    """(N, 2) int64 top-left (x, y) at level 0 of every tile that fits inside ``dimensions`` (w, h).

    ``scale`` is level-0 pixels per target pixel; rows run over y, then x (row-major).
    """
    patch_level0 = round(patch_size * scale)
    stride = (patch_size - overlap) * scale

    def starts(extent: int) -> np.ndarray:
        count = int((extent - patch_level0) // stride) + 1 if extent >= patch_level0 else 0
        positions = np.round(np.arange(count + 1) * stride).astype(np.int64)  # one spare for rounding
        return positions[positions + patch_level0 <= extent]

    ys, xs = np.meshgrid(starts(dimensions[1]), starts(dimensions[0]), indexing="ij")
    return np.stack([xs.ravel(), ys.ravel()], axis=1)  # (N, 2)


def tissue_fractions(
    mask: np.ndarray, coords: np.ndarray, patch_level0: int, dimensions: tuple[int, int]
) -> np.ndarray:
    """(N,) fraction of each tile's footprint that ``mask`` (h, w, at thumbnail scale) marks as tissue."""
    height, width = mask.shape
    fx, fy = width / dimensions[0], height / dimensions[1]  # mask pixels per level-0 pixel
    # Integral image with a zero row/column in front: box sum = I[y1,x1] - I[y0,x1] - I[y1,x0] + I[y0,x0].
    integral = np.pad(mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    x0 = np.clip(np.round(coords[:, 0] * fx).astype(np.int64), 0, width - 1)
    y0 = np.clip(np.round(coords[:, 1] * fy).astype(np.int64), 0, height - 1)
    x1 = np.clip(np.round((coords[:, 0] + patch_level0) * fx).astype(np.int64), x0 + 1, width)
    y1 = np.clip(np.round((coords[:, 1] + patch_level0) * fy).astype(np.int64), y0 + 1, height)
    inside = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return inside / ((x1 - x0) * (y1 - y0))


def draw_qc(
    thumbnail: np.ndarray, mask: np.ndarray, coords: np.ndarray, patch_level0: int, dimensions
) -> Image.Image:
    """Thumbnail with the tissue contour (green) and every kept tile (blue outline); ``mask`` is
    resized (nearest) to the thumbnail when their sizes differ."""
    mask8 = cv2.resize(mask.astype(np.uint8), thumbnail.shape[1::-1], interpolation=cv2.INTER_NEAREST)
    ring = cv2.getStructuringElement(cv2.MORPH_RECT, (3, 3))
    contour = cv2.dilate(mask8 & ~cv2.erode(mask8, ring) & 1, ring).astype(bool)
    pixels = np.array(thumbnail, np.uint8)
    pixels[contour] = (0, 180, 0)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    fx, fy = thumbnail.shape[1] / dimensions[0], thumbnail.shape[0] / dimensions[1]
    width = max(1, max(thumbnail.shape[:2]) // 700)  # still visible when the PNG is viewed shrunk
    for x, y in coords:
        box = (x * fx, y * fy, (x + patch_level0) * fx, (y + patch_level0) * fy)
        draw.rectangle(box, outline=(30, 60, 220), width=width)
    return image


def tiling_settings(
    target_mpp: float,
    magnification: float | None,
    patch_size: int,
    overlap: int,
    min_tissue: float,
    mpp_override: float | None,
    tissue: TissueConfig,
) -> dict:
    """What a tiling depends on, as its status file records it (JSON: tuples become lists)."""
    settings = dict(
        target_mpp=None if magnification else target_mpp,
        magnification=magnification,
        patch_size=patch_size,
        overlap=overlap,
        min_tissue=min_tissue,
        mpp_override=mpp_override,
        tissue=dataclasses.asdict(tissue),
    )
    return json.loads(json.dumps(settings))


def _parameter(key: str) -> str:
    """The parameter of a settings key: ``tissue.min_saturation`` (of `TissueConfig`) ->
    ``min_saturation``."""
    return key.removeprefix("tissue.")


def settings_differences(earlier: dict, now: dict) -> list[str]:
    """Only the settings that differ, by their parameter: ```patch_size=224` (the tiles there: 256)``."""

    def flat(settings: dict) -> dict:
        out = {}
        for key, value in settings.items():
            out |= {f"{key}.{k}": v for k, v in value.items()} if isinstance(value, dict) else {key: value}
        return out

    def shown(value) -> str:
        return "default" if value is None else str(value)  # None: the option was not given

    earlier, now = flat(earlier), flat(now)
    return [
        f"`{_parameter(key)}={shown(now.get(key))}` (the tiles there: {shown(earlier.get(key))})"
        for key in dict.fromkeys([*now, *earlier])
        if earlier.get(key) != now.get(key)
    ]


def earlier_tiling(
    out_dir: str | os.PathLike, slide_id: str, settings: dict
) -> tuple[dict | None, list[str]]:
    """``(status, differences)`` of a finished earlier tiling of ``slide_id`` in ``out_dir`` (``(None, [])``
    when there is none): its status record, and the settings (`tiling_settings`) it was made with that
    differ from ``settings`` (`settings_differences`; empty when the same)."""
    paths = OutputPaths.for_slide(out_dir, slide_id)
    if not paths.status.is_file():
        return None, []
    status = json.loads(paths.status.read_text())
    if not (status.get("status") == "ok" and paths.coords.is_file() or status.get("status") == "empty"):
        return None, []
    return status, settings_differences(status.get("settings") or {}, settings)


def _existing_done(paths: OutputPaths, settings: dict) -> dict | None:
    """The ok/empty status of a finished earlier run with these settings; `UserError` if the settings
    differ."""
    status, differences = earlier_tiling(paths.coords.parent.parent, paths.coords.stem, settings)
    if differences:
        raise UserError(
            f"{paths.coords} was made with other settings: {'; '.join(differences)}; its "
            f"{status.get('n_tiles', 0)} tiles are kept: pass `overwrite=True` to replace them, or choose "
            "another `out_dir=...`"
        )
    return status


def tile_slide(
    slide_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    target_mpp: float = 0.5,
    patch_size: int = 256,
    overlap: int = 0,
    min_tissue: float = 0.5,
    mpp_override: float | None = None,
    tissue: TissueConfig = TissueConfig(),  # noqa: B008 - frozen dataclass, safe to share
    overwrite: bool = False,
    magnification: float | None = None,
) -> TileResult:
    """Tile one slide into ``out_dir`` (see the module docstring for the outputs).

    ``magnification``, when given, replaces ``target_mpp`` (see `magnification_to_mpp`).
    Finished outputs with the same settings are skipped unless ``overwrite``. On failure the
    status file says so, no coords or QC file is left for the slide, and the error is re-raised.
    """
    if patch_size <= 0:
        raise ConfigError(f"`patch_size={patch_size}`: must be positive")
    if not 0 <= overlap < patch_size:
        raise ConfigError(f"`overlap={overlap}`: must be in [0, patch size {patch_size})")
    if not 0 <= min_tissue <= 1:
        raise ConfigError(f"`min_tissue={min_tissue}`: must be in [0, 1]")
    slide_path = Path(slide_path).resolve()
    slide_id = slide_path.stem
    paths = OutputPaths.for_slide(out_dir, slide_id)
    settings = tiling_settings(
        target_mpp, magnification, patch_size, overlap, min_tissue, mpp_override, tissue
    )
    if not overwrite and (done := _existing_done(paths, settings)):
        return TileResult(slide_id, str(slide_path), "skipped", done["n_tiles"], 0.0, done.get("message", ""))

    start = time.perf_counter()
    try:
        slide = open_slide(slide_path, mpp=mpp_override)
        mpp = target_mpp if magnification is None else magnification_to_mpp(slide, magnification)
        if mpp <= 0:
            raise ConfigError(f"`target_mpp={mpp}`: must be positive")
        scale = mpp / slide.mpp  # level-0 pixels per target pixel; slide.mpp refuses implausible values
        patch_level0 = round(patch_size * scale)
        if patch_level0 < 1:
            raise UserError(
                f"{slide_path}: a {patch_size}-px tile at {mpp:.4g} mpp is {patch_size * scale:.3g} level-0 "
                f"pixels of {slide.mpp:.4g} um; raise `patch_size=...` or `target_mpp=...`"
            )
        warnings = []
        if scale < 1 - LEVEL_MPP_TOLERANCE:
            warnings.append(
                f"target {mpp:.4g} mpp is finer than the slide's level 0 ({slide.mpp:.4g} mpp, from "
                f"{slide.mpp_source}): tiles are upsampled {1 / scale:.3g}x; pass "
                f"`target_mpp={slide.mpp:.4g}` or coarser unless this is meant"
            )
        mask_mpp = mask_mpp_for(tissue, patch_level0, slide.mpp)
        slide.unreadable.clear()  # the slide is cached per process: only this run's reads
        image = slide.read_downsampled(mask_mpp / slide.mpp)  # (h, w, 3) from the closest pyramid level
        mask = tissue_mask(image, slide.mpp * slide.dimensions[0] / image.shape[1], tissue)
        level0_magnification = slide.objective_power or MPP_TIMES_MAGNIFICATION / slide.mpp
        grid = grid_coords(slide.dimensions, patch_size, overlap, scale)
        coords = grid[tissue_fractions(mask, grid, patch_level0, slide.dimensions) >= min_tissue]
        attrs = dict(
            patch_size=patch_size,
            patch_level=slide.best_level_for_mpp(mpp),
            patch_size_level0=patch_level0,
            mpp=slide.mpp,
            target_mpp=mpp,
            overlap=overlap,
            slide_path=str(slide_path),
            slide_id=slide_id,
            level0_magnification=level0_magnification,
            target_magnification=level0_magnification * slide.mpp / mpp,
        )
        if len(coords):
            write_coords(paths.coords, coords, attrs)
        else:
            paths.coords.unlink(missing_ok=True)  # an earlier run's coords are not this run's
            warnings.insert(
                0,
                _why_no_tiles(
                    slide, image, mask, grid, patch_size, mpp, patch_level0, min_tissue, tissue, paths.qc
                ),
            )
        qc_downsample = max(1.0, max(slide.dimensions) / QC_MIN_SIDE)
        qc_image = image if max(image.shape[:2]) >= QC_MIN_SIDE else slide.read_downsampled(qc_downsample)
        if slide.unreadable:
            warnings.append(_unreadable_warning(slide.unreadable))
        with atomic_path(paths.qc) as tmp:
            # Fast zlib level: on a 20x slide's QC picture it saves 40 % of the time for 4 % more bytes.
            draw_qc(qc_image, mask, coords, patch_level0, slide.dimensions).save(
                tmp, format="PNG", compress_level=1
            )
    except BaseException as error:  # KeyboardInterrupt too: never leave a coords file for a failed slide
        for path in (paths.coords, paths.qc):
            path.unlink(missing_ok=True)
        if is_disk_full(error):
            raise  # no status can be written either; the run stops with one line (`reporting_full_disk`)
        message = str(error) if isinstance(error, UserError) else f"{type(error).__name__}: {error}"
        status = dict(
            slide_id=slide_id,
            slide_path=str(slide_path),
            status="failed",
            n_tiles=0,
            seconds=round(time.perf_counter() - start, 3),
            message=message,
            settings=settings,
        )
        write_json(paths.status, status)
        raise
    seconds = time.perf_counter() - start
    outcome, message = "ok" if len(coords) else "empty", "; ".join(warnings)
    status = dict(
        slide_id=slide_id,
        slide_path=str(slide_path),
        status=outcome,
        n_tiles=len(coords),
        seconds=round(seconds, 3),
        message=message,
        settings=settings,
    )
    write_json(paths.status, status)
    return TileResult(slide_id, str(slide_path), outcome, len(coords), seconds, message)


def _unreadable_warning(damage: list) -> str:
    """One sentence on the regions a whole-level read could not decode (`Slide.unreadable`)."""
    first = damage[0]
    regions = len({(d.location, d.level) for d in damage})
    return (
        f"{regions} region(s) of the slide file cannot be read (first: level-0 ({first.location[0]}, "
        f"{first.location[1]}), level {first.level}: {first.reason}); they were taken as glass for tissue "
        "detection, and `extract` leaves out, names and records the tiles it cannot read"
    )


def _why_no_tiles(
    slide: Slide,
    image: np.ndarray,
    mask: np.ndarray,
    grid: np.ndarray,
    patch_size: int,
    mpp: float,
    patch_level0: int,
    min_tissue: float,
    tissue: TissueConfig,
    qc_path: Path,
) -> str:
    """One sentence: why a slide has no tile, where to look, and which option to change."""
    width, height = slide.dimensions
    if not len(grid):
        return (
            f"no tiles: the slide is {width} x {height} px at level 0, smaller than one {patch_size}-px tile "
            f"at {mpp:.4g} mpp ({patch_level0} level-0 px); see {qc_path}; lower `patch_size=...` or "
            "`target_mpp=...`"
        )
    if lacks_colour(image, tissue):
        return (
            f"no tiles: the image has no colour (grayscale or unstained), and tissue is found by its stain; "
            f"see {qc_path}; `min_saturation=0` counts every pixel that is not near-black as tissue"
        )
    if not mask.any():
        return (
            f"no tiles: no tissue found; see {qc_path}; if pale tissue was missed, pass a "
            "`min_saturation=...` below the automatic glass cut (0.04-0.10), e.g. `min_saturation=0.02`"
        )
    return (
        f"no tiles: tissue covers {mask.mean():.1%} of the slide but no tile reaches "
        f"`min_tissue={min_tissue}`; see {qc_path}; lower `min_tissue=...`"
    )
