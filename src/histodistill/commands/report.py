"""Write a self-contained static HTML report of a run directory or of a whole demo chain.

Metrics tables, training curves, every figure the run wrote (reconstruction grids, confusion
matrices, ROC curves, tiling QC, heatmaps, top-tile montages), stage timings and the resolved
configs, in one HTML file with the images embedded: no external assets, no JavaScript.
"""

from __future__ import annotations

import argparse

from histodistill.commands._arguments import output_file

HELP = "write a self-contained HTML report (metrics, curves, figures, timings, config) of a run or demo"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "run_dir", metavar="RUN_DIR", help="a run directory (fit, mil, tile) or a demo output directory"
    )
    parser.add_argument(
        "--out", default=None, type=output_file, help="HTML file to write (default RUN_DIR/report.html)"
    )
    parser.add_argument(
        "--max-images",
        type=int,
        default=12,
        help="most figures shown per folder, e.g. QC images of many slides (default 12)",
    )


def run(args: argparse.Namespace) -> int:
    from histodistill.eval.report import build_report

    path = build_report(args.run_dir, args.out, max_images=args.max_images)
    print(f"wrote {path}")
    return 0
