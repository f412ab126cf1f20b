"""Export the backbone of a histodistill checkpoint as timm-loadable weights.

Writes DIR/model.safetensors (loads strictly into timm.create_model(<timm_name>, num_classes=0,
**model_kwargs)) and DIR/backbone.json (architecture, arguments, mean/std, input size, mpp).
The directory can then be given to `histodistill extract --model DIR`.
"""

from __future__ import annotations

import argparse

from histodistill.commands._arguments import output_folder

HELP = "export a checkpoint's backbone as model.safetensors + backbone.json (timm-loadable)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="CKPT",
                        help="a checkpoint written by `histodistill fit` (e.g. RUN/checkpoints/last.ckpt)")
    parser.add_argument("--out", required=True, type=output_folder, metavar="DIR",
                        help="directory to write model.safetensors and backbone.json into (created if missing)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing export in DIR")


def run(args: argparse.Namespace) -> int:
    from histodistill.features.export import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out, overwrite=args.overwrite)
    print(f"exported backbone to {out}")
    return 0
