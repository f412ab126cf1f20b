"""Draw each slide's MIL attention over its thumbnail, and a montage of its top- and bottom-k tiles.

Reads the out-of-fold attention a `histodistill mil` run saved (<run>/attention/<slide_id>.h5: each
slide is scored by the fold model that did not train on it) and the slides themselves. Writes
<slide_id>_heatmap.png and <slide_id>_tiles.png (at most 1600 px wide) to <run>/figures/heatmaps/
unless --out says otherwise.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from histodistill.commands._arguments import output_folder

HELP = "attention heatmaps over slide thumbnails + top/bottom tile montages from a `mil` run"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="run directory of `histodistill mil` (holds attention/)")
    parser.add_argument("--slides", default=None,
                        help="directory of slide files named <slide_id>.<ext>, or a CSV with columns slide_id,path "
                        "(relative paths are relative to the CSV), for slides that moved after tiling or coords that "
                        "did not name them (default: the slide_path the tiling recorded)")
    parser.add_argument("--slide-ext", metavar="EXT", default=None,
                        help="suffix of the slides in a --slides directory, e.g. .svs (default: any slide suffix)")
    parser.add_argument("--top-k", type=int, default=8,
                        help="tiles per row of the montage: the k highest and the k lowest scored (default: %(default)s)")
    parser.add_argument("--scale", choices=("rank", "value"), default="rank",
                        help="colour by the score's rank within the slide (robust to peaked attention) or by its "
                        "value (default: %(default)s)")
    parser.add_argument("--alpha", type=float, default=0.5,
                        help="opacity of the heatmap over the thumbnail, 0..1 (default: %(default)s)")
    parser.add_argument("--thumbnail-size", type=int, default=1024,
                        help="longest side of the thumbnail in pixels (default: %(default)s)")
    parser.add_argument("--slide-id", action="append", default=None,
                        help="only this slide (repeat for several); default: every slide with attention")
    parser.add_argument("--out", default=None, type=output_folder, help="output directory (default: <run>/figures/heatmaps)")


def csv_slide_paths(source: Path) -> dict[str, Path]:
    """slide_id -> slide file from a slide_id,path CSV."""
    from histodistill.data.table import read_table

    rows = read_table(source, "--slides CSV", ("slide_id", "path")).rows
    return {row["slide_id"]: (source.parent / row["path"]).resolve() for row in rows}


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from histodistill.errors import UserError
    from histodistill.eval.heatmap import read_attention, slide_heatmap
    from histodistill.io import visible_files
    from histodistill.wsi.coords import find_slide

    run_dir = Path(args.run)
    attention = {p.stem: p for p in visible_files(run_dir / "attention", (".h5",))}
    if not attention:
        raise UserError(f"no attention files in {run_dir / 'attention'}: pass --run with the --out of `histodistill mil`")
    wanted = args.slide_id or sorted(attention)
    unknown = [s for s in wanted if s not in attention]
    if unknown:
        raise UserError(f"--slide-id {unknown}: no attention for them in {run_dir / 'attention'}")
    # Every file is read before any figure is drawn, so a damaged one stops the run first.
    attrs = {slide_id: read_attention(attention[slide_id])[2] for slide_id in wanted}
    if args.slides is not None and Path(args.slides).is_file():
        paths = csv_slide_paths(Path(args.slides))
        missing = [s for s in wanted if s not in paths]
        if missing:
            raise UserError(f"--slides {args.slides} has no slide for {missing[:5]}: add them or restrict with --slide-id")
    else:  # every slide found before any is drawn
        paths = {s: find_slide(attention[s], {**attrs[s], "slide_id": s}, args.slides, args.slide_ext) for s in wanted}
    out = Path(args.out) if args.out else run_dir / "figures" / "heatmaps"
    for slide_id in tqdm(wanted, desc="heatmaps", unit="slide", dynamic_ncols=True):
        slide_heatmap(paths[slide_id], attention[slide_id], out, top_k=args.top_k, scale=args.scale,
                      alpha=args.alpha, thumbnail_size=args.thumbnail_size)
    print(f"{len(wanted)} heatmaps in {out}")
    return 0
