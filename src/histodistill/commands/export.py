"""Export the backbone of a histodistill checkpoint as a timm model folder.

Writes DIR/model.safetensors and DIR/config.json, timm's own format: `timm.create_model("local-dir:DIR",
pretrained=True)` loads it without histodistill, and so does `hf-hub:ORG/NAME` after
`huggingface_hub.upload_folder(folder_path=DIR, repo_id=ORG/NAME)`. With --model-card, also DIR/README.md
(recipe, data, metrics, licence). The directory can be given to `histodistill extract --model DIR`.
"""

from __future__ import annotations

import argparse

from histodistill.commands._arguments import output_folder

HELP = "export a checkpoint's backbone as a timm model folder (model.safetensors + config.json)"
PARAMETERS = {"out_dir": "out", "license_id": "license"}  # `export_checkpoint`'s, by their options' dests


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint",
        required=True,
        metavar="CKPT",
        help="a checkpoint written by `histodistill fit` (e.g. RUN/checkpoints/last.ckpt)",
    )
    parser.add_argument(
        "--out",
        required=True,
        type=output_folder,
        metavar="DIR",
        help="directory to write model.safetensors and config.json into (created if missing)",
    )
    parser.add_argument(
        "--model-card",
        action="store_true",
        help="also write DIR/README.md, a Hugging Face model card: architecture and preprocessing, "
        "the run's recipe and data (RUN/config.yaml), metrics (RUN/metrics.json), licence",
    )
    parser.add_argument(
        "--license",
        default="unknown",
        metavar="ID",
        help="licence of the exported weights for the model card, a Hugging Face licence id such "
        "as cc-by-nc-4.0 or apache-2.0 (default unknown)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing export in DIR")


def run(args: argparse.Namespace) -> int:
    from histodistill.features.export import export_checkpoint

    out = export_checkpoint(
        args.checkpoint,
        args.out,
        overwrite=args.overwrite,
        model_card=args.model_card,
        license_id=args.license,
    )
    print(f"exported backbone to {out}")
    return 0
