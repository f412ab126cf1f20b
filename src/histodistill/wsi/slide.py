"""One `Slide` interface over OpenSlide, TiffSlide and plain images, with mpp-aware reading.

Backends are tried in this order (the first that opens the file wins):

1. OpenSlide (openslide-python + openslide-bin): Aperio SVS, Hamamatsu, MIRAX, tiled generic TIFF...
2. TiffSlide: tiled 8-bit RGB TIFFs OpenSlide refuses (some OME-TIFF and SVS variants).
3. Plain images (PNG, JPEG, untiled TIFF) via Pillow, held in memory as a one-level slide.

Every read returns RGB uint8; areas outside the slide or transparent in it come back as white
glass, so tissue detection and models never see black padding. Open handles are cached per
process (`open_slide`); the cache is dropped in a forked child, which must not share file
handles with its parent.
"""

from __future__ import annotations

import os
import warnings
from abc import ABC, abstractmethod
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from histodistill.errors import UserError

# A level whose mpp is at most this much finer than asked is used as is: scanners report
# downsamples like 4.0002, and a 0.1 % resize is not worth a second pass over the pixels.
LEVEL_MPP_TOLERANCE = 1e-3
# A level-0 mpp outside this range describes no microscope: writers' default resolution tags
# (72, 96, 300, 600 dpi) are 42..353 um/px, a unit mistake by 10 gives 2.5 or 0.025 um/px at 20x.
PLAUSIBLE_MPP = (0.05, 16.0)
OVERRIDE_SOURCE = "the override (`mpp_override=...`, or the slide CSV's `mpp` column)"
# Whole-level reads (tissue detection, QC) go in strips of at most this many pixels.
STRIP_PIXELS = 16_000_000


# A whole-level read that meets an unreadable region reads that strip again in blocks of this side, so
# only the blocks holding the damage are lost (read as glass), not the whole strip.
UNREADABLE_BLOCK = 256


class UnreadableRegion(UserError):
    """Pixels the slide file cannot give: a corrupt JPEG tile, a truncated or damaged file. Names the slide,
    the region (level-0 top-left, level, size) and the decoder's reason."""

    def __init__(self, path: Path, location: tuple[int, int], level: int, size: tuple[int, int], reason: str):
        self.path, self.location, self.level, self.size, self.reason = path, location, level, size, reason
        super().__init__(
            f"{path}: the {size[0]} x {size[1]} px region at level-0 ({location[0]}, {location[1]}), "
            f"level {level}, cannot be read ({reason})"
        )

    def __reduce__(self):  # rebuilt from its fields when it comes back from a worker process
        return UnreadableRegion, (self.path, self.location, self.level, self.size, self.reason)


def _to_rgb_uint8(image: Image.Image, path: Path) -> np.ndarray:
    """Pillow image of any 8-bit mode -> (h, w, 3) uint8; transparency is composited onto white."""
    if image.mode in ("I", "F") or ";16" in image.mode:  # deep formats the header checks missed
        _refuse_deep_pixels(path, 16 if ";16" in image.mode else 32)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))
    return np.asarray(image.convert("RGB"))  # L, 1, P, CMYK, YCbCr: colour conversion is exact enough


class Slide(ABC):
    """A multi-resolution RGB image. Locations are (x, y) at level 0; sizes are (width, height)."""

    path: Path
    level_dimensions: list[tuple[int, int]]
    level_downsamples: list[float]
    objective_power: float | None

    def __init__(self, path: Path, metadata_mpp: float | None, mpp_override: float | None, mpp_source: str):
        self.path = path
        self.slide_id = path.stem
        self._metadata_mpp = metadata_mpp
        self._mpp_override = mpp_override
        # where `mpp` comes from, for messages
        self.mpp_source = OVERRIDE_SOURCE if mpp_override else mpp_source
        self.unreadable: list[UnreadableRegion] = []  # regions `read_downsampled` read as glass

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    @property
    def mpp(self) -> float:
        """Microns per pixel at level 0: the override if given, else the slide's metadata.

        Raises `UserError` when there is none, or when it lies outside `PLAUSIBLE_MPP` whatever its
        source (a 72 dpi tag would otherwise make one-pixel tiles).
        """
        mpp = self._mpp_override or self._metadata_mpp
        if mpp is None:
            raise UserError(
                f"{self.path}: the slide has no microns-per-pixel in its metadata; pass `mpp_override=X` "
                "(or an `mpp` column in the slide CSV) with the scanner's resolution in um/px"
            )
        if not PLAUSIBLE_MPP[0] <= mpp <= PLAUSIBLE_MPP[1]:
            raise UserError(
                f"{self.path}: level-0 mpp {mpp:.4g} um/px read from {self.mpp_source} is outside "
                f"{PLAUSIBLE_MPP[0]}-{PLAUSIBLE_MPP[1]} um/px, so it describes no microscope scan (72 dpi, a "
                "common writer default, is 352.8 um/px); pass `mpp_override=X` with the scanner's resolution"
            )
        return mpp

    @abstractmethod
    def _read(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """(h, w, 3) uint8 of a region that lies entirely inside ``level``."""

    @abstractmethod
    def close(self) -> None:
        """Release the backend's file handle."""

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """(h, w, 3) uint8 of ``size`` pixels at ``level``, top-left ``location`` at level 0; white
        outside."""
        if not 0 <= level < self.level_count:
            raise ValueError(f"{self.path}: level {level} does not exist (the slide has {self.level_count})")
        width, height = size
        downsample = self.level_downsamples[level]
        level_w, level_h = self.level_dimensions[level]
        # The requested box in level coordinates, then its intersection with the level.
        x0, y0 = int(location[0] // downsample), int(location[1] // downsample)
        cx0, cy0 = max(x0, 0), max(y0, 0)
        cx1, cy1 = min(x0 + width, level_w), min(y0 + height, level_h)
        if cx0 == x0 and cy0 == y0 and cx1 == x0 + width and cy1 == y0 + height:
            return self._read(location, level, size)
        out = np.full((height, width, 3), 255, np.uint8)
        if cx1 > cx0 and cy1 > cy0:
            inside_location = (round(cx0 * downsample), round(cy0 * downsample))
            out[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0] = self._read(
                inside_location, level, (cx1 - cx0, cy1 - cy0)
            )
        return out

    def level_mpp(self, level: int) -> float:
        return self.mpp * self.level_downsamples[level]

    def best_level_for_downsample(self, downsample: float) -> int:
        """The coarsest level whose downsample is at most ``downsample`` (level 0 if none is)."""
        fine_enough = [
            level
            for level in range(self.level_count)
            if self.level_downsamples[level] <= downsample * (1 + LEVEL_MPP_TOLERANCE)
        ]
        return max(fine_enough, default=0)

    def best_level_for_mpp(self, target_mpp: float) -> int:
        """The coarsest level that is still at least as fine as ``target_mpp`` (level 0 if none is)."""
        return self.best_level_for_downsample(target_mpp / self.mpp)

    def read_box(self, location: tuple[int, int], size_level0: float, size_px: int) -> np.ndarray:
        """(size_px, size_px, 3) uint8 of the square of side ``size_level0`` level-0 pixels at ``location``.

        One read from the coarsest level at least as fine as the output, then one resize. Needs no
        mpp, so coords of other tools (CLAM, TRIDENT) are read by their level-0 patch size alone.
        """
        level = self.best_level_for_downsample(size_level0 / size_px)
        read_px = max(1, round(size_level0 / self.level_downsamples[level]))
        region = self.read_region(location, level, (read_px, read_px))
        if read_px == size_px:
            return region
        # Pillow's bilinear filter widens its support when shrinking, so this is anti-aliased.
        resized = Image.fromarray(region).resize((size_px, size_px), Image.Resampling.BILINEAR)
        return np.asarray(resized)

    def read_at_mpp(self, location: tuple[int, int], size_px: int, target_mpp: float) -> np.ndarray:
        """(size_px, size_px, 3) uint8 at ``target_mpp``, top-left at level-0 ``location``.

        One read from `best_level_for_mpp`, then one resize, so 0.5 mpp tiles from a 0.25 mpp slide
        with a 1.0 mpp level below it cost one read of 2 x size_px at level 0 each.
        """
        return self.read_box(location, size_px * target_mpp / self.mpp, size_px)

    def read_downsampled(self, downsample: float) -> np.ndarray:
        """The whole slide as (round(H / downsample), round(W / downsample), 3) uint8, H x W at level 0.

        Read from the coarsest level at least as fine (a downsample below 1 reads level 0 as is), in
        horizontal strips of at most `STRIP_PIXELS`, each shrunk with area averaging, so memory stays
        bounded on a slide without coarse levels.
        """
        downsample = max(downsample, 1.0)
        level = self.best_level_for_downsample(downsample)
        level_w, level_h = self.level_dimensions[level]
        out_w = max(1, round(self.dimensions[0] / downsample))
        out_h = max(1, round(self.dimensions[1] / downsample))
        rows_per_out = level_h / out_h  # level rows per output row
        out_rows_per_strip = max(1, int(STRIP_PIXELS / level_w / rows_per_out))
        strips = []
        for r0 in range(0, out_h, out_rows_per_strip):
            r1 = min(out_h, r0 + out_rows_per_strip)
            y0 = min(round(r0 * rows_per_out), level_h - 1)
            y1 = max(min(round(r1 * rows_per_out), level_h), y0 + 1)
            location = (0, round(y0 * self.level_downsamples[level]))
            try:
                region = self.read_region(location, level, (level_w, y1 - y0))
            except UnreadableRegion:
                region = self._read_around_damage(location, level, (level_w, y1 - y0))
            strips.append(
                cv2.resize(region, (out_w, r1 - r0), interpolation=cv2.INTER_AREA).reshape(r1 - r0, out_w, 3)
            )
        return np.concatenate(strips)

    def get_thumbnail(self, max_size: int) -> np.ndarray:
        """The whole slide as (h, w, 3) uint8, longest side ``max_size`` (or level 0's, if smaller), aspect
        kept.

        `read_downsampled`, so regions the slide file cannot give come back as glass and are listed in
        ``self.unreadable`` (OpenSlide's own thumbnail stops at the first corrupt tile, breaking the handle).
        """
        return self.read_downsampled(max(self.dimensions) / max_size)

    def _read_around_damage(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """``read_region`` in `UNREADABLE_BLOCK` blocks: unreadable ones come back white (glass) and are added
        to ``self.unreadable``, so tissue detection loses the damaged blocks only, and says so."""
        out = np.full((size[1], size[0], 3), 255, np.uint8)
        downsample = self.level_downsamples[level]
        for by in range(0, size[1], UNREADABLE_BLOCK):
            for bx in range(0, size[0], UNREADABLE_BLOCK):
                block = (min(UNREADABLE_BLOCK, size[0] - bx), min(UNREADABLE_BLOCK, size[1] - by))
                at = (location[0] + round(bx * downsample), location[1] + round(by * downsample))
                try:
                    out[by : by + block[1], bx : bx + block[0]] = self.read_region(at, level, block)
                except UnreadableRegion as damage:
                    self.unreadable.append(damage)
        return out


class OpenSlideLikeSlide(Slide):
    """OpenSlide and TiffSlide share one API; only the property names of mpp and power differ."""

    def __init__(self, path: Path, handle, prefix: str, mpp_override: float | None):
        self._handle = handle
        self._reopen = type(handle)  # OpenSlide or TiffSlide: called with the path after a read error
        properties = handle.properties
        mpp_x, mpp_y = properties.get(f"{prefix}.mpp-x"), properties.get(f"{prefix}.mpp-y")
        metadata_mpp = None
        if mpp_x not in (None, "") and float(mpp_x) > 0:
            # Non-square pixels are rare; their mean keeps tile areas right to first order.
            metadata_mpp = (float(mpp_x) + float(mpp_y or mpp_x)) / 2
        super().__init__(
            path,
            metadata_mpp,
            mpp_override,
            f"its `{prefix}.mpp-x` property (for a plain TIFF: its XResolution and ResolutionUnit tags)",
        )
        power = properties.get(f"{prefix}.objective-power")
        self.objective_power = float(power) if power not in (None, "") and float(power) > 0 else None
        self.level_dimensions = [tuple(map(int, dims)) for dims in handle.level_dimensions]
        self.level_downsamples = [float(d) for d in handle.level_downsamples]

    def _read(self, location, level, size):
        try:
            region = self._handle.read_region(tuple(map(int, location)), level, tuple(map(int, size)))
        except Exception as error:  # noqa: BLE001 - OpenSlideError, or TiffSlide's decoders' own error types
            # OpenSlide keeps an error for good: every later read of this handle would fail, so open it again.
            self._handle.close()
            self._handle = self._reopen(str(self.path))
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise UnreadableRegion(
                self.path, tuple(map(int, location)), level, tuple(map(int, size)), reason
            ) from None
        return _to_rgb_uint8(region, self.path)

    def close(self) -> None:
        self._handle.close()


class ImageSlide(Slide):
    """A non-pyramidal image (PNG, JPEG, untiled TIFF) as a one-level slide held in memory."""

    def __init__(self, path: Path, image: Image.Image, mpp_override: float | None):
        metadata_mpp, source = _image_mpp(image)
        super().__init__(path, metadata_mpp, mpp_override, source)
        self._pixels = _to_rgb_uint8(image, path)  # (H, W, 3)
        self.objective_power = None
        self.level_dimensions = [(self._pixels.shape[1], self._pixels.shape[0])]
        self.level_downsamples = [1.0]

    def _read(self, location, level, size):
        x, y = map(int, location)
        return self._pixels[y : y + size[1], x : x + size[0]].copy()

    def close(self) -> None:
        """Nothing to release: the pixels were read into memory when the slide was opened."""


def _image_mpp(image: Image.Image) -> tuple[float | None, str]:
    """``(mpp or None, the tag it came from)`` of a plain image's resolution tag.

    TIFF tags in centimetres or inches, PNG pHYs (Pillow reports it as dpi) and JPEG JFIF dpi are
    read alike. A desktop default such as 72 dpi is returned as it is: `Slide.mpp` refuses it by name.
    """
    dpi = image.info.get("dpi")
    tag = {"PNG": "PNG pHYs chunk", "JPEG": "JPEG JFIF density"}.get(
        image.format, f"{image.format} resolution"
    )
    if image.format == "TIFF" and 296 in image.tag_v2:  # ResolutionUnit: 2 inch, 3 centimetre
        unit, resolution = image.tag_v2[296], image.tag_v2.get(282)
        tag = "TIFF XResolution and ResolutionUnit tags"
        if resolution and unit in (2, 3):
            dpi = (float(resolution) * (2.54 if unit == 3 else 1.0),)
    if not dpi or not dpi[0] or float(dpi[0]) <= 0:
        return None, "no resolution tag"
    return 25400.0 / float(dpi[0]), f"its {tag} ({float(dpi[0]):.4g} dpi)"


def available_memory() -> int:
    """Bytes of memory available to new allocations (MemAvailable on Linux, free pages elsewhere)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _open_plain_image(path: Path) -> Image.Image:
    """Open and decode a plain image, also beyond Pillow's pixel limit when memory allows.

    Pillow refuses images over twice ``Image.MAX_IMAGE_PIXELS`` (a guard against decompression
    bombs from untrusted sources). A user's own slide export is not one: it is read whole when its
    decoded pixels (and one RGB copy) fit in the available memory, else refused with the way out.
    """
    limit = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        Image.MAX_IMAGE_PIXELS = None  # header only: the size is checked below, before decoding
        try:
            image = Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = limit
        width, height = image.size
        if limit and width * height > limit:
            needed = width * height * 3 * 2  # decoded pixels + the RGB copy the slide keeps
            available = available_memory()
            if needed > available:
                raise UserError(
                    f"{path}: the image is {width} x {height} px ({width * height / 1e6:.0f} Mpx), beyond "
                    f"Pillow's pixel limit of {limit / 1e6:.0f} Mpx, and reading it whole needs about "
                    f"{needed / 2**30:.1f} GiB of memory ({available / 2**30:.1f} GiB available); convert it "
                    f"to a tiled pyramidal TIFF, e.g. `vips tiffsave {path.name} {path.stem}.tif --tile "
                    "--pyramid --compression jpeg --Q 90 --tile-width 256 --tile-height 256`, and tile that"
                )
        image.load()
    return image


def _tiff_layout(path: Path) -> tuple[bool, int] | None:
    """``(tiled, bits per sample)`` of a TIFF's first page, or None when the file is not a TIFF."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            return bool(page.is_tiled), page.dtype.itemsize * 8 if page.dtype is not None else 0
    except Exception:  # not a TIFF (or a broken one): the backends below will say why
        return None


def _png_bit_depth(path: Path) -> int | None:
    with open(path, "rb") as handle:
        header = handle.read(26)  # signature (8), IHDR length + type (8), width, height (8), depth (1)
    return header[24] if header[:8] == b"\x89PNG\r\n\x1a\n" and len(header) > 24 else None


def _refuse_deep_pixels(path: Path, bits: int | None) -> None:
    # Checked before any backend: OpenSlide and Pillow would silently keep the high byte, which
    # turns 12-bit data stored in 16-bit samples into a nearly black image.
    if bits is not None and bits > 8:
        raise UserError(
            f"{path}: {bits}-bit samples are not supported because their intensity scale is ambiguous; "
            "convert the file to 8-bit RGB first (e.g. ImageMagick `convert in.tif -depth 8 out.tif`)"
        )


def _open_uncached(path: Path, mpp_override: float | None) -> Slide:
    import openslide

    if not path.is_file():
        raise UserError(f"{path}: slide file not found")
    tiff = _tiff_layout(path)
    _refuse_deep_pixels(path, tiff[1] if tiff else _png_bit_depth(path))
    try:
        return OpenSlideLikeSlide(path, openslide.OpenSlide(str(path)), "openslide", mpp_override)
    except openslide.OpenSlideError as error:
        openslide_error = error  # kept for the message if no backend can read the file
    if tiff is not None and tiff[0]:
        import tiffslide

        return OpenSlideLikeSlide(path, tiffslide.TiffSlide(path), "tiffslide", mpp_override)
    try:
        image = _open_plain_image(path)
    except OSError as error:
        raise UserError(
            f"{path}: not a readable slide or image (OpenSlide: {openslide_error}; Pillow: {error}); "
            "check that the file is complete and in a format OpenSlide or Pillow reads"
        ) from None
    return ImageSlide(path, image, mpp_override)


_CACHE: dict[tuple[Path, float | None], Slide] = {}
_CACHE_PID = os.getpid()


def open_slide(path: str | os.PathLike, mpp: float | None = None) -> Slide:
    """Open ``path`` with the first backend that reads it; cached per process and per ``mpp`` override.

    ``mpp`` overrides the slide's own microns-per-pixel (for slides whose metadata lacks it or is
    wrong). Raises `UserError` naming the file when no backend can read it.
    """
    global _CACHE_PID
    if os.getpid() != _CACHE_PID:  # forked child: the parent's handles are not ours to use
        _CACHE.clear()
        _CACHE_PID = os.getpid()
    key = (Path(path).resolve(), mpp)
    if key not in _CACHE:
        _CACHE[key] = _open_uncached(key[0], mpp)
    return _CACHE[key]


def close_all() -> None:
    """Close every cached slide of this process (long-running tools call this between batches)."""
    for slide in _CACHE.values():
        slide.close()
    _CACHE.clear()
