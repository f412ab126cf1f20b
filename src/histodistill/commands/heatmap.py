"""Draw each slide's MIL attention over its thumbnail, and a montage of its top- and bottom-k tiles.

Reads the out-of-fold attention a `histodistill mil` run saved (<run>/attention/<slide_id>.h5: each
slide is scored by the fold model that did not train on it) and the slides themselves. Writes
<slide_id>_heatmap.png and <slide_id>_tiles.png (at most 1600 px wide) to <run>/figures/heatmaps/
unless --out says otherwise.
"""

from __future__ import annotations

import argparse

from histodistill.commands._arguments import output_folder

HELP = "attention heatmaps over slide thumbnails + top/bottom tile montages from a `mil` run"
PARAMETERS = {"slide_ids": "slide_id", "slides_dir": "slides"}  # `run_heatmaps`'s, by their options' dests


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="run directory of `histodistill mil` (holds attention/)")
    parser.add_argument(
        "--slides",
        default=None,
        help="directory of slide files named <slide_id>.<ext>, or a CSV with columns slide_id,path "
        "(relative paths are relative to the CSV), for slides that moved after tiling or coords that "
        "did not name them (default: the slide_path the tiling recorded)",
    )
    parser.add_argument(
        "--slide-ext",
        metavar="EXT",
        default=None,
        help="suffix of the slides in a --slides directory, e.g. .svs (default: any slide suffix)",
    )
    parser.add_argument(
        "--top-k",
        type=int,
        default=8,
        help="tiles per row of the montage: the k highest and the k lowest scored (default: %(default)s)",
    )
    parser.add_argument(
        "--scale",
        choices=("rank", "value"),
        default="rank",
        help="colour by the score's rank within the slide (robust to peaked attention) or by its "
        "value (default: %(default)s)",
    )
    parser.add_argument(
        "--alpha",
        type=float,
        default=0.5,
        help="opacity of the heatmap over the thumbnail, 0..1 (default: %(default)s)",
    )
    parser.add_argument(
        "--thumbnail-size",
        type=int,
        default=1024,
        help="longest side of the thumbnail in pixels (default: %(default)s)",
    )
    parser.add_argument(
        "--slide-id",
        action="append",
        default=None,
        help="only this slide (repeat for several); default: every slide with attention",
    )
    parser.add_argument(
        "--out", default=None, type=output_folder, help="output directory (default: <run>/figures/heatmaps)"
    )


def run(args: argparse.Namespace) -> int:
    from histodistill.eval.heatmap import run_heatmaps

    drawn, out = run_heatmaps(
        args.run,
        args.slides,
        args.slide_ext,
        args.slide_id,
        args.out,
        top_k=args.top_k,
        scale=args.scale,
        alpha=args.alpha,
        thumbnail_size=args.thumbnail_size,
    )
    print(f"{len(drawn)} heatmaps in {out}")
    return 0
