"""Find tissue on each slide and write its tile grid at a target resolution.

  histodistill tile SLIDE_OR_DIR_OR_CSV --out DIR [--mpp 0.5 | --magnification 20] --patch-size 256

Per slide: DIR/patches/<slide_id>.h5 (coords, CLAM/TRIDENT layout), DIR/qc/<slide_id>.png
(thumbnail, tissue contour, tiles) and DIR/status/<slide_id>.json (ok/empty/failed, tiles, seconds,
and why a slide has no tile).
Slides already tiled with the same settings are skipped; a failing slide is reported and the
others go on; the exit status is 1 when any slide failed. A slide without tiles gets one warning
line. Under torchrun or srun each process tiles its share of the slides; --shard I/N splits them
across the jobs of a SLURM array (`histodistill.distributed`). See docs/tiling.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from histodistill.commands._arguments import output_folder
from histodistill.distributed import add_shard_argument
from histodistill.wsi.formats import SLIDE_SUFFIXES

HELP = "detect tissue and write tile coordinates (CLAM/TRIDENT HDF5) for a slide, a folder or a CSV of slides"
# `tile_slide`'s parameters that options of other names pass (`histodistill.errors`).
PARAMETERS = {"target_mpp": "mpp", "out_dir": "out"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "source",
        metavar="SLIDE_OR_DIR_OR_CSV",
        help="one slide file; a folder (its slide files, not recursive: "
        + " ".join(sorted(SLIDE_SUFFIXES))
        + "); or a CSV with a `path` column (relative paths are taken from the CSV's folder) and an "
        "optional `mpp` column that overrides the slide's mpp for that row",
    )
    parser.add_argument(
        "--out",
        required=True,
        type=output_folder,
        help="output directory; patches/, qc/ and status/ are made inside",
    )
    resolution = parser.add_mutually_exclusive_group()
    resolution.add_argument(
        "--mpp",
        type=float,
        default=None,
        help="target resolution of the tiles in microns per pixel (default 0.5)",
    )
    resolution.add_argument(
        "--magnification",
        type=float,
        default=None,
        help="target objective magnification instead of --mpp: 20 = the slide's mpp x objective power / 20 "
        "when the slide states its objective power, else 0.5 mpp (40 = 0.25 mpp)",
    )
    parser.add_argument(
        "--patch-size",
        type=int,
        default=256,
        help="tile side in pixels at the target resolution (default 256)",
    )
    parser.add_argument(
        "--overlap",
        type=int,
        default=0,
        help="pixels (at the target resolution) shared by neighbouring tiles (default 0)",
    )
    parser.add_argument(
        "--min-tissue",
        type=float,
        default=0.5,
        help="keep a tile when tissue covers at least this fraction of it (default 0.5)",
    )
    parser.add_argument(
        "--mpp-override",
        type=float,
        default=None,
        help="level-0 microns per pixel to use instead of the slides' metadata (needed for slides without "
        "it, e.g. most PNG/JPEG); a CSV `mpp` column wins over this for its row",
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="slides tiled in parallel, one process each (default 1)"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="tile again even where finished outputs exist (default: skip those)",
    )
    parser.add_argument(
        "--mask-mpp",
        type=float,
        default=None,
        help="resolution of the tissue mask in microns per pixel, read from the closest pyramid level "
        "(default: a 16th of a tile's side, at most 8)",
    )
    parser.add_argument(
        "--min-saturation",
        type=float,
        default=None,
        help="bright pixels less saturated than this (HSV, 0..1) are glass; set it below the automatic cut "
        "for very pale tissue, 0 to count every pixel that is not near-black (default: automatic, Otsu over "
        "the bright pixels clipped to 0.04-0.10)",
    )
    add_shard_argument(parser)


def collect_slides(source: Path, mpp_override: float | None) -> list[tuple[Path, float | None]]:
    """``(slide path, mpp override or None)`` for every slide named by a file, folder or CSV."""
    from histodistill.data.table import read_table
    from histodistill.errors import UserError
    from histodistill.io import visible_files

    if source.is_dir():
        slides = visible_files(source, tuple(SLIDE_SUFFIXES))
        if not slides:
            raise UserError(
                f"{source}: no slide files in this folder (looked for {', '.join(sorted(SLIDE_SUFFIXES))})"
            )
        found = [(path, mpp_override) for path in slides]
    elif source.suffix.lower() == ".csv" and source.is_file():
        rows = read_table(source, "slide CSV", ("path",)).rows
        if not rows:
            raise UserError(f"{source}: the slide CSV has a header but no rows")
        found = []
        for line, row in enumerate(rows, start=2):
            mpp = row.get("mpp") or ""
            try:
                row_mpp = float(mpp) if mpp.strip() else mpp_override
            except ValueError:
                raise UserError(f"{source} line {line}: `mpp` must be a number, got {mpp!r}") from None
            found.append((source.parent / row["path"], row_mpp))
    elif source.exists():
        found = [(source, mpp_override)]
    else:
        raise UserError(f"{source}: no such slide, folder or CSV")
    by_id: dict[str, Path] = {}
    for path, _ in found:
        if by_id.setdefault(path.stem, path) != path:
            raise UserError(
                f"{source}: two slides share the id {path.stem!r} ({by_id[path.stem]} and {path}); "
                "outputs are named by file stem, so rename one"
            )
    return found


def _tile_one(job: dict):
    """Run `tile_slide` and turn any failure into a failed `TileResult` (runs in worker processes)."""
    from histodistill.errors import UserError
    from histodistill.io import DiskFullError
    from histodistill.wsi.tiling import TileResult, tile_slide

    try:
        return tile_slide(**job)
    except DiskFullError:
        raise  # every later slide would fail too: the run stops with one line
    except Exception as error:
        message = str(error) if isinstance(error, UserError) else f"{type(error).__name__}: {error}"
        path = Path(job["slide_path"])
        return TileResult(path.stem, str(path), "failed", 0, 0.0, message)


def refuse_other_settings(jobs: list[dict], out: Path) -> None:
    """One `UserError` before any work when finished tiles in ``out`` were made with other settings, naming
    only the settings that differ and the fix; the old tiles stay as they are."""
    from histodistill.errors import UserError
    from histodistill.wsi.tiling import earlier_tiling, tiling_settings

    conflicts = []
    for job in jobs:
        settings = tiling_settings(
            job["target_mpp"],
            job["magnification"],
            job["patch_size"],
            job["overlap"],
            job["min_tissue"],
            job["mpp_override"],
            job["tissue"],
        )
        status, differences = earlier_tiling(out, Path(job["slide_path"]).stem, settings)
        if differences:
            conflicts.append((status, differences))
    if conflicts:
        tiles = sum(int(status.get("n_tiles", 0)) for status, _ in conflicts)
        raise UserError(
            f"{out / 'patches'}: {len(conflicts)} of {len(jobs)} slides were tiled there with other settings "
            f"({'; '.join(conflicts[0][1])}); their {tiles} tiles are kept: pass --overwrite to tile them "
            "again with these settings, or choose another --out"
        )


def _tile_all(jobs: list[dict], workers: int, results: list, progress) -> None:
    """Tile every job, appending to ``results`` in job order; ``workers`` processes when more than one."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    if workers == 1:
        for job in jobs:
            results.append(_tile_one(job))
            progress.update()
        return
    # spawn, not fork: a forked worker would inherit the parent's open slide handles and threads.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=context) as pool:
        for result in pool.map(_tile_one, jobs):
            results.append(result)
            progress.update()


def space_needed(out: Path, slides: int) -> int | None:
    """Bytes the tiling of ``slides`` slides needs in ``out``: the finished slides' coords, QC and status
    files scaled to all of them (None before any slide is finished)."""
    done = list((out / "status").glob("*.json"))
    if not done:
        return None
    written = sum(
        p.stat().st_size
        for folder in ("patches", "qc", "status")
        for p in (out / folder).glob("*")
        if p.is_file()
    )
    return round(written / len(done) * slides)


def run(args: argparse.Namespace) -> int:
    import sys

    from tqdm import tqdm

    from histodistill.distributed import this_process
    from histodistill.errors import UserError, render_parameters
    from histodistill.io import reporting_full_disk
    from histodistill.wsi.tissue import TissueConfig

    if args.workers < 1:
        raise UserError(f"--workers must be at least 1, got {args.workers}")
    if args.mask_mpp is not None and args.mask_mpp <= 0:
        raise UserError(f"--mask-mpp must be positive, got {args.mask_mpp}")
    tissue = TissueConfig(mask_mpp=args.mask_mpp, min_saturation=args.min_saturation)
    share = this_process(args.shard)
    slides = sorted(collect_slides(Path(args.source), args.mpp_override), key=lambda slide: slide[0].stem)
    if share.count > 1:  # sorted by id above, so every process cuts the same list
        print(share.describe(len(share.select(slides)), len(slides)))
    jobs = [
        dict(
            slide_path=path,
            out_dir=args.out,
            target_mpp=args.mpp or 0.5,
            patch_size=args.patch_size,
            overlap=args.overlap,
            min_tissue=args.min_tissue,
            mpp_override=mpp,
            tissue=tissue,
            overwrite=args.overwrite,
            magnification=args.magnification,
        )
        for path, mpp in share.select(slides)
    ]
    if not args.overwrite:
        refuse_other_settings(jobs, Path(args.out))
    progress = tqdm(total=len(jobs), desc="tile", unit="slide", disable=len(jobs) < 2)
    results = []
    with reporting_full_disk(args.out, lambda: space_needed(Path(args.out), len(jobs))):
        try:
            _tile_all(jobs, args.workers, results, progress)
        finally:
            progress.close()  # before any error line, which would otherwise follow the bar on its line

    if len(results) == 1 and results[0].status == "failed" and Path(args.source).suffix.lower() != ".csv":
        # One slide named on the command line that cannot be tiled is bad input, not a partial batch.
        failed = results[0]
        raise UserError(
            failed.message
            if failed.slide_path in failed.message
            else f"{failed.slide_path}: {failed.message}"
        )
    for result in results:
        message = render_parameters(result.message, args._flags)  # `min_tissue=0.5` -> --min-tissue 0.5
        if result.status == "failed":
            print(f"failed: {result.slide_path}: {message}", file=sys.stderr)
        elif result.message:  # why a slide has no tile, or an upsampling warning
            print(f"warning: {result.slide_path}: {message}", file=sys.stderr)
    counts = {
        status: sum(r.status == status for r in results) for status in ("ok", "empty", "skipped", "failed")
    }
    no_tiles = sum(r.status != "failed" and r.n_tiles == 0 for r in results)
    tiles = sum(r.n_tiles for r in results)
    print(
        f"{len(results)} slides: {counts['ok'] + counts['empty']} tiled, {counts['skipped']} already done, "
        f"{counts['failed']} failed, {no_tiles} with no tiles; {tiles} tiles in {Path(args.out) / 'patches'}"
    )
    return 1 if counts["failed"] else 0
