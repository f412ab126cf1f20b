"""Argument types shared by the subcommands (a module, not a command: its name starts with ``_``)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def output_folder(value: str) -> str:
    """``type=`` of an ``--out`` folder: an existing file there is refused while the arguments are parsed,
    before any work (otherwise the first ``mkdir`` deep inside a stage fails with a traceback)."""
    if Path(value).exists() and not Path(value).is_dir():
        raise argparse.ArgumentTypeError(f"{value} is a file, not a folder: pass a folder to write into")
    return value


def add_model_arguments(parser: argparse.ArgumentParser, required: bool) -> None:
    """``--model``, ``--weights`` and ``--random-init``: which frozen backbone, with which weights
    (`histodistill.models.backbones.create_backbone`); checked by `check_model_arguments`."""
    parser.add_argument("--model", required=required, metavar="NAME_OR_CKPT_OR_DIR",
                        help="a registered name (e.g. tiny/resnet18-64, pathology/uni), any timm model name, an "
                             "hf-hub: id, a histodistill .ckpt, or a directory made by `histodistill export`")
    parser.add_argument("--weights", metavar="FILE",
                        help="local weights to load into --model (.safetensors, or a .pth/.pt/.bin state dict); "
                             "without it a name loads its published pretrained weights (Hugging Face cache or hub) "
                             "and a checkpoint or export uses its own")
    parser.add_argument("--random-init", action="store_true",
                        help="randomly initialised weights (seed 0) instead of the pretrained ones; a baseline, said "
                             "on stderr and recorded (extract: extractor.json; probe: probe.json)")


def check_model_arguments(args: argparse.Namespace) -> None:
    """Refuse contradicting weight options (`UserError`) before any work."""
    from histodistill.errors import UserError

    if args.random_init and args.weights:
        raise UserError("--random-init and --weights contradict each other: pass one of them")
    if args.random_init and os.path.exists(args.model):
        raise UserError(f"--random-init applies to model names; {args.model} carries its own weights: "
                        "pass its architecture's name (e.g. the timm name) for random weights")
