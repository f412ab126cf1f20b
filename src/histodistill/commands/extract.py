"""Extract frozen-backbone features for every tile of every slide (or for an image folder).

Slides: --coords DIR is a `histodistill tile` output (DIR/patches/*.h5), or a patches/ folder of ours,
CLAM's create_patches_fp or TRIDENT (--slides SLIDE_DIR finds slides such coords do not name); writes
OUT/features_<model>/<slide_id>.h5 (features (N, D) float32, coords (N, 2) int64) and
OUT/features_<model>/extractor.json. <model> is a folder-safe slug of --model: "/" and ":" become "-",
a checkpoint RUN/checkpoints/last.ckpt becomes RUN-last, an exported directory its name; --random-init
adds -random-init (features_resnet50-random-init), so random weights never take the pretrained folder name.
Images: --images DIR (DIR/<class>/<image>) writes OUT/features_<model>/features.h5 with features,
labels, paths and a `classes` attribute, for `histodistill probe`.
Finished slides are skipped on a rerun (files are written atomically), so an interrupted run resumes.
Under torchrun or srun each process takes its share of the slides (and its own GPU); --shard I/N
splits them across the jobs of a SLURM array (`histodistill.distributed`).
"""

from __future__ import annotations

import argparse

from histodistill.commands._arguments import add_model_arguments, check_model_arguments, output_folder
from histodistill.distributed import add_shard_argument, usable_cpus

HELP = "features for every tile of every slide (or an image folder) from any backbone or checkpoint"
# `extract_slides`/`extract_images` parameters passed by options of other names (`histodistill.errors`).
PARAMETERS = {
    "coords_dir": "coords",
    "slides_dir": "slides",
    "images_dir": "images",
    "out_dir": "out",
    "num_workers": "workers",
    "pretrained=False": "random_init",
}
# More DataLoader workers than this rarely speeds up reading tiles and multiplies open slides and memory.
MAX_DEFAULT_WORKERS = 8


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, required=True)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--coords",
        metavar="DIR",
        help="a tiling output directory containing patches/*.h5, or a patches/ folder itself; coords "
        "of `histodistill tile`, CLAM's create_patches_fp and TRIDENT are read as they are",
    )
    parser.add_argument(
        "--slides",
        metavar="DIR",
        default=None,
        help="folder holding the slides as <slide_id>.<ext>, for coords that do not name their slide "
        "(CLAM, TRIDENT) or whose slides moved after tiling (default: the slide_path in each "
        "coords file)",
    )
    parser.add_argument(
        "--slide-ext",
        metavar="EXT",
        default=None,
        help="suffix of the slides in --slides, e.g. .svs (default: any slide suffix tile knows)",
    )
    source.add_argument("--images", metavar="DIR", help="an image folder DIR/<class>/<image> (patch dataset)")
    parser.add_argument(
        "--out",
        required=True,
        type=output_folder,
        metavar="DIR",
        help="where the features_<model>/ folder is written",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="tiles per forward pass (default 64)")
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="DataLoader worker processes reading tiles (default: the CPUs this process may use, "
        f"at most {MAX_DEFAULT_WORKERS}; 0 reads in the main process)",
    )
    parser.add_argument(
        "--device",
        default="auto",
        help="auto (CUDA if available, else CPU), cpu, cuda or cuda:N (default auto)",
    )
    parser.add_argument(
        "--precision",
        choices=("32", "bf16"),
        default="32",
        help="32: float32; bf16: bfloat16 autocast (fast on recent GPUs); features are saved "
        "as float32 either way (default 32)",
    )
    parser.add_argument(
        "--context-window",
        type=int,
        metavar="S",
        help="context-aware features (MCM-KD): for each tile, run the model on the S x S window of "
        "tiles centred on it (S odd, e.g. 3; every cell resized to the model's input size, border "
        "windows include glass or the white beyond the slide edge) and keep the centre cell of "
        "its feature map, pooled. Needs --coords and a CNN or a ViT with a dynamic input size; "
        "written to OUT/features_<model>-context<S>/ so it never mixes with per-patch features "
        "(default: off, one tile per forward pass)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="extract again even where features exist (also allows replacing features of "
        "other weights in the same folder)",
    )
    add_shard_argument(parser)


def run(args: argparse.Namespace) -> int:
    from histodistill.distributed import process_group, this_process
    from histodistill.errors import UserError
    from histodistill.features.extract import extract_images, extract_slides

    workers = default_workers() if args.workers is None else args.workers
    if args.batch_size < 1 or workers < 0:
        raise UserError("--batch-size must be >= 1 and --workers >= 0")
    check_model_arguments(args)
    options = dict(
        weights=args.weights,
        batch_size=args.batch_size,
        num_workers=workers,
        device=args.device,
        precision=args.precision,
        overwrite=args.overwrite,
        pretrained=not args.random_init,
    )
    if args.images:
        if args.context_window is not None:
            raise UserError(
                "--context-window needs --coords: context windows are cut from slides, not image folders"
            )
        if args.shard:
            raise UserError(
                "--shard needs --coords: an image folder is extracted into one file by one process"
            )
        out = extract_images(args.model, args.images, args.out, **options)
    else:
        share = this_process(args.shard)
        with process_group():  # torchrun: a barrier for extractor.json
            out = extract_slides(
                args.model,
                args.coords,
                args.out,
                **options,
                context_window=args.context_window,
                slides_dir=args.slides,
                slide_ext=args.slide_ext,
                share=share,
            )
    print(f"features in {out}")
    return 0


def default_workers() -> int:
    """The CPUs this process may run on (`usable_cpus`), at most `MAX_DEFAULT_WORKERS`."""
    return min(usable_cpus(), MAX_DEFAULT_WORKERS)
